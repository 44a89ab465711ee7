"""Packing: several examples in one row, each with its own position ids starting at 0.

transformers (5.x) reads restarting position ids, given with no 2D attention mask, as packed sequences
and builds a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`), for eager, sdpa and
flash attention alike. Whether a model takes that path is checked on the model itself (`packing_works`),
so an architecture that does not is refused instead of silently attending across examples.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from lmtune.data import Example
from lmtune.data.format import IGNORE


@dataclass
class Packed:
    """One row of examples laid end to end."""

    examples: list[Example]

    @property
    def length(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def pack(examples: list[Example], max_length: int) -> list[Packed]:
    """Best-fit decreasing: longest example first, into the fullest row it still fits in."""
    rows: list[Packed] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append(Packed([e]))
            room, index = max_length - n, len(rows) - 1
        else:
            room, index = free.pop(at)
            rows[index].examples.append(e)
            room -= n
        bisect.insort(free, (room, index))
    return rows


def collate_packed(rows: list[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows, right-padded. No attention_mask: position ids alone mark where each example starts.

    The first label of every example is dropped: in a row, the position before it is the previous
    example's last token, which must not learn to predict the next example (unpacked, nothing does).
    `token_mask` marks real tokens for counting; the model never sees it.
    """
    width = max(r.length for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    token_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, packed in enumerate(rows):
        at = 0
        for e in packed.examples:
            n = len(e.input_ids)
            input_ids[row, at:at + n] = torch.tensor(e.input_ids)
            labels[row, at + 1:at + n] = torch.tensor(e.labels[1:])
            positions[row, at:at + n] = torch.arange(n)
            at += n
        token_mask[row, :at] = 1
        positions[row, at:] = torch.arange(width - at)  # the padding is one more (unlearned) sequence
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "token_mask": token_mask}
    if any(e.anchored for r in rows for e in r.examples):  # data.preserve packs its answers apart from the task's
        batch["anchored"] = torch.tensor([all(e.anchored for e in r.examples) for r in rows])
    return batch


@torch.no_grad()
def packing_works(model: torch.nn.Module) -> bool:
    """True when two examples in one row give the second the logits it has alone (no attention between them).

    Two checks, so that 16-bit weights pass as well as fp32 ones: the second example's logits do not depend on the
    first (another first example changes nothing: the masked keys add exact zeros), and they equal its logits alone
    up to the dtype's rounding at another shape. An attending model misses both by O(1) (the default model: 16 of
    logits up to 33, where fp32 rounding is 5e-5 and bf16's 0.5).
    """
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 100))
    gen = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(min(3, vocab - 1), vocab, (1, n), generator=gen).to(device)
                            for n in (5, 5, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
    # No cache: transformers looks for packed sequences only when there is none (TunedModel always says so).
    from lmtune.tuned import TunedModel

    kw = {} if isinstance(model, TunedModel) else {"use_cache": False}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        together, after_other = (model(input_ids=torch.cat([head, second], dim=1), attention_mask=None,
                                       position_ids=positions, **kw).logits[:, 5:].float() for head in (first, other))
        alone = model(input_ids=second, attention_mask=torch.ones_like(second), **kw).logits.float()
    except Exception:  # noqa: BLE001 - an architecture that rejects position_ids cannot pack
        return False
    finally:
        for m, training in modes.items():
            m.training = training
    scale = max(1.0, float(alone.abs().max()))
    rounding = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2  # of the logits' scale
    return bool((together - after_other).abs().max() <= 1e-3 * scale
                and (together - alone).abs().max() <= rounding * scale)
