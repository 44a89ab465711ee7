"""lmtune: fine-tune Hugging Face causal LMs with every method of the seed's taxonomy.

The public API is imported lazily so that `lmtune --help` does not pay for torch and transformers.
"""

from importlib import import_module

_API = {
    "LmtuneError": "lmtune.errors",
    "RunConfig": "lmtune.config",
    "load_config": "lmtune.config",
    "load_model": "lmtune.models",
    "TunedModel": "lmtune.tuned",
    "apply": "lmtune.tuned",
    "load": "lmtune.checkpoint",
    "train": "lmtune.train",
}
__all__ = list(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lmtune' has no attribute '{name}'")
    module = import_module(_API[name])
    return getattr(module, "run" if name == "train" else name)
