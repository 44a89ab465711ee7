"""The method registry: every fine-tuning method of the seed's taxonomy registers one `Method`.

A method is a config class plus plain functions (`apply`, and where the math allows `merge`).
`apply` changes the model in place and leaves `requires_grad=True` on exactly what trains;
checkpoints save exactly those parameters (or the whole model, for `full` / `freeze`).
Each method module calls `register` once at its bottom; nothing else in the package names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Discriminator, Tag, model_serializer
from torch import nn

from lmtune.errors import LmtuneError
from lmtune.schema import Strict, validate_as

DEFAULT = "lora"
"""The method of a config that names none (`method.r=16` alone sets its options)."""


class MethodConfig(Strict):
    """Base of every method's options; `name` selects the method. A subclass declares `name: Literal["its name"]
    = "its name"`: the config's `method` section is the union of them, told apart by `name`."""

    name: str

    @model_serializer(mode="wrap")
    def _always_named(self, handler: Any) -> Any:
        """Every dump says which method it is, `exclude_defaults` ones too, so that it parses back."""
        data = handler(self)
        return {"name": self.name, **data} if isinstance(data, dict) else data


@dataclass(frozen=True)
class Method:
    """What the rest of lmtune knows about a method."""

    name: str
    config: type[MethodConfig]
    apply: Callable[[nn.Module, Any], None]
    """Wrap / unfreeze in place; afterwards `requires_grad` marks exactly what trains."""
    saves_whole_model: bool = False
    """Save a full transformers model directory instead of an adapter file pair."""
    peft_type: str | None = None
    """PEFT's name for the method, when PEFT has it (its checkpoints are then interchangeable); for a format of
    lmtune's own (bottleneck adapters: LMTUNE_ADAPTER), the type its adapter_config.json is recognised by."""
    to_peft: Callable[[Any, nn.Module], dict] | None = None
    """Method config -> the method-specific fields of PEFT's adapter_config.json."""
    from_peft: Callable[[dict], dict] | None = None
    """PEFT adapter_config.json -> our method options (a mapping validated by `config`)."""
    merge: Callable[[nn.Module], nn.Module] | None = None
    """Fold the method into the base weights and return the plain transformers model."""
    merge_refusal: str = "this method cannot be merged into the base weights"
    prepare_inputs: Callable[[nn.Module, dict[str, Any]], tuple[dict[str, Any], int]] | None = None
    """The prompt family's input hook: forward kwargs -> the kwargs the transformers model gets, and how many
    positions it prepended to the sequence (their logits are dropped). Forward, generate and the objectives
    all go through it."""
    adapter_state: Callable[[nn.Module], dict[str, Any]] | None = None
    """The adapter file's tensors under PEFT's keys, when they are not simply the trainable parameters."""
    load_adapter_state: Callable[[nn.Module, dict[str, Any], str], None] | None = None
    """Load such a file's tensors into the applied method (the last argument names the file for errors)."""
    takes_tokenizer: bool = False
    """`apply` accepts `tokenizer=` (e.g. prompt tuning's init from text)."""
    gradient_checkpointing_refusal: str | None = None
    """Why this method cannot train with gradient checkpointing; None when it can."""


_REGISTRY: dict[str, Method] = {}


_ON_REGISTER: list[Callable[[], None]] = []


def on_register(hook: Callable[[], None]) -> None:
    """Call `hook` after every later `register` / `unregister` (a plugin's method, a test's): `config.py` rebuilds
    RunConfig's method union."""
    _ON_REGISTER.append(hook)


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    for hook in _ON_REGISTER:
        hook()
    return method


def unregister(name: str) -> None:
    """Remove a method registered for a while (a test's)."""
    _REGISTRY.pop(name)
    for hook in _ON_REGISTER:
        hook()


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise LmtuneError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_for_peft_type(peft_type: str) -> Method:
    _load_all()
    for method in _REGISTRY.values():
        if method.peft_type == peft_type:
            return method
    raise LmtuneError(f"lmtune cannot load PEFT adapters of type '{peft_type}'")


PEFT_METADATA = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                           "revision", "inference_mode"})
"""adapter_config.json keys that describe the file, not the computation."""


def _is_off(value: Any) -> bool:
    return value is None or value is False or value in ("none", "") or value == {} or value == []


def check_peft_options(peft: dict, understood: frozenset[str] | set[str]) -> None:
    """Refuse a PEFT adapter that sets an option lmtune does not implement: loaded without it, its outputs would
    differ from PEFT's. An allow-list: metadata, the keys the method reads (`understood`), and any other key only
    at its "off" value (None, false, "none", empty), so an option added to PEFT later is refused too."""
    for key, value in peft.items():
        if key not in PEFT_METADATA and key not in understood and not _is_off(value):
            raise LmtuneError(f"this PEFT {peft.get('peft_type')} adapter sets {key}={value!r}, which lmtune does not "
                              "implement (it would give different outputs); load it with PEFT, or retrain without it")


def _named(value: Any) -> Any:
    """The shorthands of a method section: `"lora"` is `{"name": "lora"}`; options alone are the default method's."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        return value if "name" in value else {"name": DEFAULT, **value}
    if isinstance(value, MethodConfig):
        return value
    raise ValueError("must be a method name or a mapping with a 'name' key")


def _name_of(value: Any) -> str | None:
    """The tag of a method section (`name: null` is an unknown name too, not a missing one)."""
    return str(value.get("name")) if isinstance(value, dict) else getattr(value, "name", None)


def method_config_type() -> Any:
    """The type of a method section, in RunConfig and wherever a method config is read (checkpoints, the API):
    every registered method's config class, told apart by `name`, with the shorthands of `_named`."""
    _load_all()
    return _union(tuple((name, _REGISTRY[name].config) for name in sorted(_REGISTRY)))


@cache
def _union(configs: tuple[tuple[str, type[MethodConfig]], ...]) -> Any:
    # A function reads the tag: pydantic's `discriminator="name"` refuses the `Strict` before-validator on `name`.
    tagged = tuple(Annotated[config, Tag(name)] for name, config in configs)
    return Annotated[Union[tagged], Discriminator(_name_of), BeforeValidator(_named)]  # noqa: UP007


def parse_method_config(value: Any) -> MethodConfig:
    """`"lora"`, `{"name": "lora", "r": 16}` or a config object -> the method's validated config."""
    return validate_as(method_config_type(), value, prefix="method")
