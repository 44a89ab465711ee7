"""Prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691) and P-tuning
(Liu et al., 2021, https://arxiv.org/abs/2103.10385).

Rule: the input becomes [P; x], P = `num_virtual_tokens` soft token embeddings; the model is frozen.
Prompt tuning trains P itself. Init: `vocab` (embeddings of random vocabulary tokens, the default),
`random` (N(0, 1), PEFT's default) or `text` (embeddings of `init_text`, e.g. the class labels, repeated or
cut to length: the seed notes label init works best on small models).
P-tuning trains embeddings E and uses P = encoder(E): an MLP (`Linear-ReLU-Linear-ReLU-Linear`) or a
bidirectional LSTM followed by `Linear-ReLU-Linear`, as the paper and PEFT build them.
Checkpoints are PEFT's (PROMPT_TUNING / P_TUNING): one tensor `prompt_embeddings` = P.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from lmtune.errors import LmtuneError
from lmtune.methods import Method, register
from lmtune.methods._virtual import (
    VirtualTokenConfig,
    VirtualTokens,
    adapter_state,
    attach,
    check_peft_submodules,
    check_position_room,
    encoder_of,
    extend_inputs,
    load_adapter_state,
    new_embedding,
)


class PromptConfig(VirtualTokenConfig):
    name: Literal["prompt"] = "prompt"
    init: Literal["random", "vocab", "text"] = "vocab"
    """Initial soft tokens: `vocab` (random vocabulary tokens' embeddings: the model's own scale, which the paper
    found better than random), `random` N(0, 1) (PEFT's default), or `text` (`init_text`)."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt when init is `text` (repeated or cut to length)."""

    @field_validator("init_text")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must contain some text")
        return v


class PTuningConfig(VirtualTokenConfig):
    name: Literal["p-tuning"] = "p-tuning"
    encoder: Literal["mlp", "lstm"] = "mlp"
    """Prompt encoder: `mlp`, or `lstm` (bidirectional LSTM + MLP, as in the P-tuning paper)."""
    encoder_hidden_size: int | None = Field(None, ge=1)
    """Hidden size of the prompt encoder; empty means the model's hidden size."""
    encoder_num_layers: int = Field(2, ge=1)
    """LSTM layers (the MLP always has PEFT's three Linear layers)."""
    encoder_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout between LSTM layers."""


class LstmHead(nn.Module):
    """Bidirectional LSTM over the virtual-token sequence, then an MLP back to the model's width."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                                 bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(table.unsqueeze(0))[0])[0]


def _mlp_head(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, dim))


def _token_dim(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]


def _init_ids(model: nn.Module, cfg: PromptConfig, tokenizer: Any) -> torch.Tensor | None:
    """Token ids whose embeddings start the prompt; None for random init."""
    n = cfg.num_virtual_tokens
    if cfg.init == "vocab":
        return torch.randint(0, model.get_input_embeddings().weight.shape[0], (n,))
    if cfg.init != "text":
        return None
    if cfg.init_text is None:
        raise LmtuneError("method.init is 'text' but method.init_text is empty; give the text (e.g. the labels)")
    if tokenizer is None:
        from lmtune.models import load_tokenizer

        source = getattr(model, "name_or_path", "") or None
        if source is None:
            raise LmtuneError("method.init 'text' needs the tokenizer: pass lmtune.apply(model, cfg, tokenizer=...)")
        tokenizer = load_tokenizer(source)
    ids = tokenizer(cfg.init_text)["input_ids"]
    return torch.tensor((ids * (n // len(ids) + 1))[:n])


def apply_prompt(model: nn.Module, cfg: PromptConfig, tokenizer: Any = None) -> None:
    embedding = new_embedding(model, cfg.num_virtual_tokens, _token_dim(model))
    ids = _init_ids(model, cfg, tokenizer)
    if ids is not None:
        words = model.get_input_embeddings()
        with torch.no_grad():
            embedding.weight.copy_(words(ids.to(words.weight.device)).float())
    attach(model, VirtualTokens(embedding))


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig) -> None:
    dim = _token_dim(model)
    hidden = cfg.encoder_hidden_size or dim
    embedding = new_embedding(model, cfg.num_virtual_tokens, dim)
    # Built on the embedding's device, not moved there: `.to()` cannot swap fake tensors (memory estimate).
    with torch.device(embedding.weight.device):
        head = (_mlp_head(dim, hidden) if cfg.encoder == "mlp"
                else LstmHead(dim, hidden, cfg.encoder_num_layers, cfg.encoder_dropout))
    attach(model, VirtualTokens(embedding, head))


def prepare_inputs(model: nn.Module, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The hook: [P; embed(x)] as inputs_embeds, mask and positions extended; returns the prepended count."""
    encoder = encoder_of(model)
    if encoder.disabled:
        return inputs, 0
    ids, embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    batch, length = embeds.shape[:2]
    n = encoder.num_virtual_tokens
    check_position_room(model, n, length)
    prompts = encoder().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    inputs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    if model.config.is_encoder_decoder:  # [P; x] is the encoder's input; the decoder's logits are all real
        mask = inputs.get("attention_mask")
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device) if mask is None else mask
        inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        return inputs, 0
    return extend_inputs(inputs, n, batch, length, embeds.device, in_sequence=True), n


def _peft_common(cfg: VirtualTokenConfig, model: nn.Module) -> dict:
    config = model.config
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": _token_dim(model),
            "num_transformer_submodules": 1, "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers, "modules_to_save": None}


_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def prompt_to_peft(cfg: PromptConfig, model: nn.Module) -> dict:
    return {**_peft_common(cfg, model), "prompt_tuning_init": _PEFT_INIT[cfg.init],
            "prompt_tuning_init_text": cfg.init_text, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}


def prompt_from_peft(peft: dict) -> dict:
    check_peft_submodules(peft, frozenset({"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                           "tokenizer_kwargs"}))  # init only: the file holds the trained prompt
    init = {v: k for k, v in _PEFT_INIT.items()}.get(str(peft.get("prompt_tuning_init")), "random")
    # The file holds the trained prompt; the init only mattered before training.
    return {"name": "prompt", "num_virtual_tokens": peft["num_virtual_tokens"],
            "init": "random" if init == "text" else init}


def p_tuning_to_peft(cfg: PTuningConfig, model: nn.Module) -> dict:
    return {**_peft_common(cfg, model), "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden_size or _token_dim(model),
            "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout}


def p_tuning_from_peft(peft: dict) -> dict:
    check_peft_submodules(peft, frozenset({"encoder_reparameterization_type", "encoder_hidden_size",
                                           "encoder_num_layers", "encoder_dropout"}))
    return {"name": "p-tuning", "num_virtual_tokens": peft["num_virtual_tokens"],
            "encoder": str(peft.get("encoder_reparameterization_type", "MLP")).lower(),
            "encoder_hidden_size": peft.get("encoder_hidden_size"),
            "encoder_num_layers": peft.get("encoder_num_layers", 2), "encoder_dropout": peft.get("encoder_dropout", 0.0)}


_SHARED = {"prepare_inputs": prepare_inputs, "adapter_state": adapter_state,
           "load_adapter_state": load_adapter_state,
           "merge_refusal": "soft prompts are extra inputs, not a change of the weights"}
register(Method(name="prompt", config=PromptConfig, apply=apply_prompt, peft_type="PROMPT_TUNING",
                to_peft=prompt_to_peft, from_peft=prompt_from_peft, takes_tokenizer=True, **_SHARED))
register(Method(name="p-tuning", config=PTuningConfig, apply=apply_p_tuning, peft_type="P_TUNING",
                to_peft=p_tuning_to_peft, from_peft=p_tuning_from_peft, **_SHARED))
