"""The estimate: a `MemoryPlan` in, the predicted peak per device out, in the seed's terms.

The number comes from tracing one steady-state training step (forward, loss, backward, clipping,
optimizer step) on fake tensors (`trace.py`): exact for every registered method and its options,
because the method is applied by its own `apply`. The breakdown shown to the user is the seed's:
weights, gradients, optimizer states, activations (logits and loss buffers included), overhead.
Options the CPU trace cannot run (8/4-bit base weights, 8-bit AdamW) swap in their byte counts
(`formulas.py`, each term cited there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lmtune.errors import LmtuneError
from lmtune.memory import formulas
from lmtune.memory.trace import StepTrace, trace_step

Precision = Literal["fp32", "bf16", "fp16", "bf16-mixed", "fp16-mixed"]
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-mixed", "fp16-mixed")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
QUANTIZATIONS = ("none", "8bit", "4bit")
_WEIGHT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "bf16-mixed": torch.float32, "fp16-mixed": torch.float32}
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
_MODEL_DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class MemoryPlan:
    """What a training run will do, as far as memory is concerned."""

    model: str | None = None
    """Model directory, config.json, GGUF file or hub id; None is the packaged default."""
    method: Any = "lora"
    """Method name, mapping of options, or method config object."""
    batch_size: int = 4
    """Sequences per micro-batch on one device."""
    seq_len: int = 1024
    """Tokens per sequence after padding (data.max_length: the worst case)."""
    labelled_fraction: float = 1.0
    """Share of positions that carry loss; only those go through the LM head. 1.0 is the worst case."""
    precision: Precision = "fp32"
    """fp32; pure bf16 / fp16 (weights, gradients and AdamW states in 16 bit); bf16-mixed / fp16-mixed
    (fp32 master weights, 16-bit autocast)."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Frozen base Linear weights in 8 bit (LLM.int8) or 4 bit (NF4 with double quantisation)."""
    optimizer: Literal["adamw", "adamw-8bit", "sgd"] = "adamw"
    gradient_checkpointing: bool = False
    packing: bool = False
    """Packed sequences: no padding, so no attention mask and every position is labelled text."""
    task: Literal["sft", "dpo"] = "sft"
    """dpo: chosen + rejected per pair, plus a reference forward pass."""
    devices: int = 1
    """Data-parallel devices; each holds a replica (or, with sharding=fsdp, a shard) and `batch_size` sequences."""
    sharding: Literal["none", "fsdp"] = "none"
    """fsdp: weights, gradients and optimizer states split across `devices` (accelerate's FSDP plugin)."""
    device: Literal["cpu", "cuda"] = "cpu"
    clip_grad: bool = True
    trust_remote_code: bool = False


@dataclass
class Estimate:
    """Predicted peak bytes per device, in the seed's terms."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    """Activations and temporaries alive at the peak: saved tensors, logits, loss buffers, kernel outputs."""
    overhead: int
    """Runtime memory that holds no tensor of this run (allocator, libraries' scratch), per device."""
    per_device: int
    total: int
    """All devices together."""
    trainable_params: int
    total_params: int
    saved_for_backward: int
    """Activations held between forward and backward (logits included): the part batch and length scale."""
    plan: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def load_model_config(name: str | None, trust_remote_code: bool = False) -> PretrainedConfig:
    """A model's config without its weights: a directory, a config.json file, a GGUF file or a hub id."""
    from pathlib import Path

    from lmtune.models import resolve_model_path

    if name is not None and Path(name).is_file() and name.endswith(".json"):
        return AutoConfig.from_pretrained(str(Path(name).parent), trust_remote_code=trust_remote_code)
    source = resolve_model_path(name)
    try:
        if source.endswith(".gguf"):
            return AutoConfig.from_pretrained(str(Path(source).parent), gguf_file=Path(source).name)
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise LmtuneError(f"cannot read the config of model '{name}': {str(err).strip().splitlines()[0]}") from None


def estimate(plan: MemoryPlan) -> Estimate:
    """Predict the peak memory of `plan`'s training run on each device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmtune.tuned import apply

    _check(plan)
    config = load_model_config(plan.model, plan.trust_remote_code)
    labelled = max(1, round((1.0 if plan.packing else plan.labelled_fraction) * (plan.seq_len - 1)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(config, dtype=_WEIGHT_DTYPE[plan.precision],
                                                 trust_remote_code=plan.trust_remote_code)
        tuned = apply(model, plan.method, base_name=plan.model)
        if not any(p.requires_grad for p in tuned.parameters()):
            raise LmtuneError("the method trains no parameter; nothing to estimate")
        if plan.quantization != "none" and tuned.method.saves_whole_model:
            raise LmtuneError(f"'{tuned.method.name}' trains base weights, which cannot be {plan.quantization}; "
                              "use lora (QLoRA) or another adapter method with a quantized base")
        if plan.gradient_checkpointing:
            _enable_checkpointing(model)
        tuned.train()
        reference = None
        if plan.task == "dpo":
            reference = "switch" if any(hasattr(m, "disabled") for m in model.modules()) else "copy"
        step = trace_step(tuned, batch_size=plan.batch_size, seq_len=plan.seq_len, labelled=labelled,
                          optimizer=plan.optimizer, autocast_dtype=_AUTOCAST.get(plan.precision),
                          foreach=plan.device == "cuda", clip=plan.clip_grad, reference=reference,
                          padded=not plan.packing)
        trainable, total = tuned.trainable_parameters()
        swaps = formulas.swaps(tuned, plan)
        if plan.sharding == "fsdp" and plan.devices > 1:
            from lmtune.memory.sharding import shard

            shard(swaps, tuned, step.weights + swaps.weights, step.gradients_at_peak + swaps.gradients,
                  step.optimizer + swaps.optimizer, plan.devices)
    return _breakdown(step, swaps, plan, trainable, total)


def _enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every block (transformers 5 renamed the method; both are accepted)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check(plan: MemoryPlan) -> None:
    for name, value, allowed in (("precision", plan.precision, PRECISIONS), ("optimizer", plan.optimizer, OPTIMIZERS),
                                 ("quantization", plan.quantization, QUANTIZATIONS)):
        if value not in allowed:
            raise LmtuneError(f"unknown {name} '{value}'; choose one of: {', '.join(allowed)}")
    if plan.batch_size < 1 or plan.seq_len < 2 or plan.devices < 1:
        raise LmtuneError("batch size and devices must be >= 1 and the sequence length >= 2")
    if not 0.0 < plan.labelled_fraction <= 1.0:
        raise LmtuneError(f"labelled fraction must be in (0, 1] (got {plan.labelled_fraction})")


def _breakdown(step: StepTrace, swaps: formulas.Swaps, plan: MemoryPlan, trainable: int, total: int) -> Estimate:
    weights = step.weights + step.reference_weights + swaps.weights
    optimizer = step.optimizer + swaps.optimizer
    gradients = step.gradients_at_peak + swaps.gradients
    peak = (step.peak + step.reference_weights + swaps.weights + swaps.optimizer + swaps.gradients
            + swaps.activations)
    activations = peak - weights - optimizer - gradients
    overhead = formulas.overhead(plan.device, peak)
    per_device = peak + overhead
    return Estimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                    overhead=overhead, per_device=per_device, total=per_device * plan.devices,
                    trainable_params=trainable, total_params=total, saved_for_backward=step.saved_for_backward,
                    plan=_plan_dict(plan), notes=swaps.notes)


def _plan_dict(plan: MemoryPlan) -> dict:
    out = asdict(plan)
    method = plan.method
    out["method"] = method.model_dump(mode="json") if hasattr(method, "model_dump") else method
    return out
