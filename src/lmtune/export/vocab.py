"""A Hugging Face byte-level BPE tokenizer as the GGUF `tokenizer.*` keys llama.cpp reads.

The keys are those llama.cpp's own `convert_hf_to_gguf.py` writes for a `gpt2`-model tokenizer (and those the
default model's shipped GGUF carries): the token strings in byte-level form, a type per token (added special
tokens are CONTROL), the merges, the pre-tokenizer name that selects llama.cpp's split regexes, the special
token ids, whether a BOS is prepended, and the chat template.

The pre-tokenizer is identified from its structure (not, as llama.cpp does, from a hash of one encoding), so a
tokenizer we do not know is refused instead of being exported with regexes that split text differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gguf
from transformers import PreTrainedTokenizerBase

from lmtune.errors import LmtuneError

_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}
_RAW_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": False}
_DIGITS = {"type": "Digits", "individual_digits": True}
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = _QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|")
# llama.cpp pre-tokenizer name -> the HF pre-tokenizer steps that split text the same way (llama-vocab.cpp).
PRE_TOKENIZERS: dict[str, list[dict]] = {
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [_DIGITS, _BYTE_LEVEL],  # also StarCoder's: each digit alone, then GPT-2's regex
    "qwen2": [{"type": "Split", "pattern": {"Regex": _QWEN2}}, _RAW_BYTE_LEVEL],
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _LLAMA3}}, _RAW_BYTE_LEVEL],
}


@dataclass
class Vocab:
    """What the GGUF file says about the tokenizer."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _steps(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    return pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]


def _matches(step: dict, want: dict) -> bool:
    return all(step.get(key) == value for key, value in want.items())


def pre_tokenizer_name(spec: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does, or a one-line refusal."""
    model = spec.get("model", {}).get("type")
    decoder = (spec.get("decoder") or {}).get("type")
    normalizer = (spec.get("normalizer") or {}).get("type")
    # NFC (Qwen2's) changes only text that is not already NFC-normalised; llama.cpp does not normalise.
    if model != "BPE" or decoder != "ByteLevel" or normalizer not in (None, "NFC"):
        raise LmtuneError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 / SmolLM / Qwen2 / Llama 3 style); "
                          f"this one is model={model}, decoder={decoder}, normalizer={normalizer}")
    steps = _steps(spec.get("pre_tokenizer"))
    for name, want in PRE_TOKENIZERS.items():
        if len(steps) == len(want) and all(_matches(s, w) for s, w in zip(steps, want, strict=True)):
            return name
    raise LmtuneError(f"GGUF export: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} has no llama.cpp "
                      f"equivalent known to lmtune (known: {', '.join(PRE_TOKENIZERS)})")


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<") and token.endswith(">"))


def read_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of `tokenizer`, padded with unused tokens up to the model's embedding rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmtuneError("GGUF export needs a fast (tokenizers) tokenizer; this model has a slow one")
    spec = json.loads(backend.to_str())
    pre = pre_tokenizer_name(spec)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise LmtuneError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            special = added[i].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    ids = {kind: getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "unk", "pad")}
    probe = tokenizer("a")["input_ids"]  # what transformers itself adds around a text
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return Vocab(tokens, [int(t) for t in types], merges, pre, {k: v for k, v in ids.items() if v is not None},
                 add_bos=ids["bos"] is not None and probe[:1] == [ids["bos"]],
                 add_eos=ids["eos"] is not None and probe[-1:] == [ids["eos"]], chat_template=template)


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)  # add_bos_token_id, add_eos_token_id, ...
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
