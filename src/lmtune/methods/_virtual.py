"""What the prompt family (prompt tuning, P-tuning, prefix tuning, P-tuning v2) shares.

Each of the four trains a table of `num_virtual_tokens` rows, optionally through an encoder
(P-tuning's MLP / LSTM, prefix tuning's MLP); the table the model uses is the encoder's output.
`VirtualTokens` holds both as a registered submodule `prompt_encoder` of the transformers model, so
every trainable tensor has a module name (resumable checkpoints keep the encoder). PEFT's adapter
file holds only the encoder's output, `prompt_embeddings`; loading one puts the module in its
inference form (the table alone), as PEFT does.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from lmtune.errors import LmtuneError
from lmtune.methods import MethodConfig, check_peft_options
from lmtune.models import position_limit

ATTRIBUTE = "prompt_encoder"
PEFT_KEY = "prompt_embeddings"


class VirtualTokenConfig(MethodConfig):
    num_virtual_tokens: int = Field(20, ge=1)
    """Virtual tokens (soft prompt / prefix length)."""


class VirtualTokens(nn.Module):
    """A trainable table (`embedding`), optionally mapped through `head`; `forward()` gives the rows used."""

    def __init__(self, embedding: nn.Embedding, head: nn.Module | None = None,
                 init_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = head
        self.disabled = False
        self.init_ids = init_ids
        """The vocabulary tokens whose embeddings / keys and values started the table, if any (for inspection)."""

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight
        return table if self.head is None else self.head(table)

    @torch.no_grad()
    def load_table(self, table: torch.Tensor) -> None:
        """Inference form: use `table` (the encoder's output, as PEFT saves it) directly; the encoder goes."""
        self.head = None
        weight = self.embedding.weight
        self.embedding = nn.Embedding(*table.shape, device=weight.device, dtype=weight.dtype)
        self.embedding.weight.copy_(table.to(weight.dtype))


def attach(model: nn.Module, encoder: VirtualTokens) -> None:
    """Freeze the base model and register `encoder` on it: afterwards only the encoder trains."""
    check_position_room(model, encoder.num_virtual_tokens, 0)
    for param in model.parameters():
        param.requires_grad_(False)
    model.add_module(ATTRIBUTE, encoder)


def encoder_of(model: nn.Module) -> VirtualTokens:
    return getattr(model, ATTRIBUTE)


def new_embedding(model: nn.Module, rows: int, dim: int) -> nn.Embedding:
    """An fp32 table (as LoRA adapters stay fp32 on a bf16 base) on the model's device, init N(0, 1) like PEFT."""
    device = model.get_input_embeddings().weight.device
    return nn.Embedding(rows, dim, device=device, dtype=torch.float32)


def check_position_room(model: nn.Module, num_virtual: int, length: int) -> None:
    """Virtual tokens take positions too: refuse what would run past a learned position table."""
    limit = position_limit(model)
    if limit is not None and num_virtual + max(length, 1) > limit:
        raise LmtuneError(f"{num_virtual} virtual tokens + {max(length, 1)} real tokens exceed the model's "
                          f"{limit} positions; lower method.num_virtual_tokens or data.max_length")


def extend_inputs(inputs: dict[str, Any], num_virtual: int, batch: int, length: int, device: torch.device,
                  in_sequence: bool) -> dict[str, Any]:
    """Mask, positions (and logits_to_keep) for `num_virtual` tokens placed before the real ones.

    `in_sequence`: the virtual tokens are input positions (prompt tuning), not a KV prefix (prefix tuning).
    Real positions count real tokens only (from the mask), so a left-padded row gets the positions, hence
    the logits, of the row without padding; given position_ids (packing) are shifted alike.
    """
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    positions = inputs.get("position_ids")
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    positions = positions + num_virtual
    inputs["attention_mask"] = torch.cat([mask.new_ones(batch, num_virtual), mask], dim=1)
    if in_sequence:
        virtual = torch.arange(num_virtual, device=positions.device).expand(positions.shape[0], -1)
        positions = torch.cat([virtual, positions], dim=1)
        keep = inputs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.dim() == 2:
            inputs["logits_to_keep"] = torch.cat([keep.new_zeros(batch, num_virtual), keep], dim=1)
    inputs["position_ids"] = positions
    return inputs


PEFT_KEYS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                       "num_layers"})
"""adapter_config.json keys every prompt-family method reads (the table's shape, checked when it loads)."""


def check_peft_submodules(peft: dict, understood: frozenset[str] = frozenset()) -> None:
    """PEFT's seq2seq default keeps a second table for the decoder; lmtune's prompt family uses one. Options the
    method does not read (`understood`: the method's own keys) are refused when set."""
    check_peft_options(peft, PEFT_KEYS | understood)
    if (peft.get("num_transformer_submodules") or 1) != 1:
        raise LmtuneError(f"this PEFT {peft.get('peft_type')} adapter has num_transformer_submodules="
                          f"{peft['num_transformer_submodules']} (a second, decoder-side table); lmtune loads "
                          "adapters saved with num_transformer_submodules=1")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter file: one tensor, the rows the model uses (the encoder's output)."""
    with torch.no_grad():
        return {PEFT_KEY: encoder_of(model)().detach().float().contiguous().cpu()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    encoder = encoder_of(model)
    if set(state) != {PEFT_KEY}:
        raise LmtuneError(f"{source}: a prompt-learning adapter holds exactly '{PEFT_KEY}' "
                          f"(found {', '.join(sorted(state)) or 'nothing'})")
    table, expected = state[PEFT_KEY], tuple(encoder().shape)
    if tuple(table.shape) != expected:
        raise LmtuneError(f"{source}: {PEFT_KEY} has shape {tuple(table.shape)} but this base model and config "
                          f"need {expected}; was the adapter trained on a different model?")
    encoder.load_table(table)
