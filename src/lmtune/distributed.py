"""Sharded training through accelerate's FSDP plugin, and the files it writes: the same as one process writes.

`accelerate launch --config_file examples/accelerate/fsdp.yaml` (or any FSDP config) turns on accelerate's
FullyShardedDataParallelPlugin; accelerate shards the model with FSDP2 (`fully_shard`) in `prepare`. Three
things lmtune adds around it:

- accelerate selects FSDP for accelerator devices only; FSDP2 runs on CPU processes over gloo as well, so on
  the CPU the plugin accelerate built from the launch is switched on here (tests run FSDP on 2 CPU processes).
- Saving: the shards are gathered into a full state dict (accelerate's `get_state_dict`, a collective) and
  loaded into a copy of the unsharded model on the main process, which then saves exactly as a one-process
  run does (same PEFT adapter, same whole model, same resumable checkpoint). The copy lives on the meta
  device between saves: it costs host memory only while a file is written.
- Resuming: a checkpoint's optimizer state, loaded into the unsharded optimizer, is re-sharded after `prepare`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_REPLICAS: dict[int, torch.nn.Module | None] = {}  # id(prepared model) -> its unsharded copy on the meta device


def make_accelerator(cpu: bool, mixed_precision: str) -> Accelerator:
    """accelerate's Accelerator, with FSDP on CPU processes when the launch asks for it."""
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    # MULTI_CPU on the first run of a process; FSDP (kept in PartialState, below) on a later run, without a plugin.
    on_cpu = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)
    if wants_fsdp and on_cpu and getattr(accelerator.state, "fsdp_plugin", None) is None:
        plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* variables, as accelerate does
        if plugin.fsdp_version != 2:
            from lmtune.errors import LmtuneError

            raise LmtuneError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config")
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def prepare(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            loader: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """accelerate's `prepare`; under FSDP also keep a meta copy for saving and re-shard a restored optimizer."""
    if not is_sharded(accelerator):
        return accelerator.prepare(model, optimizer, loader)
    restored = optimizer.state_dict() if optimizer.state else None
    optimizer.state.clear()  # keyed by the unsharded parameters, which `prepare` replaces
    replica = copy.deepcopy(model).to("meta") if accelerator.is_main_process else None
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    _REPLICAS[id(model)] = replica
    if restored is not None:
        _shard_optimizer_state(optimizer, restored)
    return model, optimizer, loader


def _shard_optimizer_state(optimizer: torch.optim.Optimizer, restored: dict) -> None:
    """Give each sharded parameter its slice of the restored (full) moments, placed as the parameter is.

    Every process holds the same full state (read from the checkpoint); copies, so that no shard aliases it.
    """
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in restored["state"].items():
        param = params[index]
        state = {}
        for key, value in entry.items():
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                value = _local_slice(value, param)
            elif isinstance(value, torch.Tensor):
                value = value.detach().clone()
            state[key] = value
        optimizer.state[param] = state


def _local_slice(full: torch.Tensor, param: Any) -> Any:
    """`full` laid out exactly as `param` (as AdamW's own `zeros_like(param)` is), holding this process's rows."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise NotImplementedError(f"resume under FSDP: placement {param.placements} is not dim-0 sharding")
    state = torch.zeros_like(param)
    local = state.to_local()
    rows = torch.chunk(full.detach(), param.device_mesh.size(), dim=0)  # FSDP2 shards dim 0 as torch.chunk
    rank = param.device_mesh.get_local_rank()
    if rank < len(rows) and local.numel():
        local.copy_(rows[rank].reshape(local.shape))
    return state


def _full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with every sharded moment gathered whole (a collective, in a fixed order)."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()  # index-keyed as in one process; values still sharded
    state = {}
    for index in sorted(sd["state"]):
        entry = sd["state"][index]
        state[index] = {key: (entry[key].full_tensor() if isinstance(entry[key], DTensor) else
                              entry[key].clone() if isinstance(entry[key], torch.Tensor) else entry[key])
                        for key in sorted(entry)}
    return {"state": state, "param_groups": sd["param_groups"]}


class _FullOptimizer:
    """The optimizer state as one process holds it, for `resume.save_checkpoint` (its `state_dict()`)."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


@contextmanager
def gathered(accelerator: Accelerator, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None = None) -> Iterator[tuple[Any, Any]]:
    """(model, optimizer) as one process would hold them, on the main process; every process must enter.

    Without sharding: the unwrapped model and the optimizer itself. Under FSDP: the full state gathered from the
    shards into the meta copy (None on the other processes), released again on leaving.
    """
    if not is_sharded(accelerator):
        yield accelerator.unwrap_model(model), optimizer
        return
    replica = _REPLICAS[id(model)]
    weights = accelerator.get_state_dict(model)
    full = _FullOptimizer(_full_optimizer_state(optimizer)) if optimizer is not None else None
    if not accelerator.is_main_process:
        yield None, None
        return
    # On the CPU "offloading" the gathered tensors is a no-op: they may still be FSDP's buffers, freed later.
    replica.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
    if hasattr(replica.model, "tie_weights"):  # assigning gave the tied head its own tensor; one again
        replica.model.tie_weights()
    try:
        yield replica, full
    finally:
        replica.to("meta")


def launch_commands(train_args: list[str], nodes: int, gpus: int, sharding: str) -> str:
    """The commands that run `lmtune train train_args` on `nodes` machines x `gpus` GPUs (printed, not run)."""
    from lmtune.errors import LmtuneError

    if nodes < 1 or gpus < 1:
        raise LmtuneError("--nodes and --gpus must be >= 1")
    if sharding not in ("ddp", "fsdp"):
        raise LmtuneError(f"--sharding {sharding}: choose ddp or fsdp")
    rest = " ".join(train_args)
    lines = [f"# {nodes} node(s) x {gpus} GPU(s) = {nodes * gpus} processes, {sharding}; global batch = "
             f"train.batch_size x train.grad_accum x {nodes * gpus}"]
    if sharding == "ddp":
        rdzv = "" if nodes == 1 else " --rdzv-backend=c10d --rdzv-endpoint=HEAD_NODE:29500 --rdzv-id=lmtune"
        lines.append(f"torchrun --nnodes={nodes} --nproc-per-node={gpus}{rdzv} -m lmtune.cli train {rest}")
    else:
        multi = "" if nodes == 1 else " --machine_rank RANK_OF_THIS_NODE --main_process_ip HEAD_NODE " \
                                      "--main_process_port 29500"
        lines.append(f"accelerate launch --config_file examples/accelerate/fsdp.yaml --num_machines {nodes} "
                     f"--num_processes {nodes * gpus}{multi} -m lmtune.cli train {rest}")
    if nodes > 1:
        lines.append("# run the same command on every node (HEAD_NODE: the address of node 0)")
    return "\n".join(lines)
