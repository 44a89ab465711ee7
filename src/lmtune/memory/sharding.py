"""FSDP (full sharding) in the estimate: what each of N devices keeps of the weights, gradients and AdamW states.

FSDP stores 1/N of every parameter, gradient and optimizer state on each device; during forward and backward
it all-gathers one wrapped layer at a time (and prefetches the next; the root unit, embeddings and head, counts as one), and each layer's gradients exist
unsharded until their reduce-scatter. So per device: W/N + 2 x the largest layer's weights, G/N + the largest
layer's trainable gradients, O/N. Activations are per device as in data parallel (each has its micro-batch).
"""

from __future__ import annotations

from torch import nn

from lmtune.memory.formulas import Swaps


def _layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names] or [model]


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def shard(swaps: Swaps, tuned: nn.Module, weights: int, gradients: int, optimizer: int, devices: int) -> None:
    """Turn the replicated figures (traced + swaps) into FSDP's per-device ones, in place."""
    layers = _layers(tuned.model)
    inside = {id(p) for m in layers for p in m.parameters()}
    rest = [p for p in tuned.parameters() if id(p) not in inside]  # the root unit: embeddings, head, final norm
    groups = [list(m.parameters()) for m in layers] + [rest]
    gathered = 2 * max(_bytes(g) for g in groups)
    layer_grads = max(_bytes(p for p in g if p.requires_grad) for g in groups)
    swaps.weights += weights // devices + gathered - weights
    swaps.gradients = gradients // devices + layer_grads - (gradients - swaps.gradients)  # no DDP bucket
    swaps.optimizer += optimizer // devices - optimizer
    swaps.notes = [n for n in swaps.notes if not n.startswith("data parallel")]
    swaps.notes.append(f"FSDP on {devices} devices: 1/{devices} of weights, gradients and optimizer states each, "
                       f"plus 2 all-gathered layers ({gathered / 2**20:.1f} MiB) and one layer's gradients")
