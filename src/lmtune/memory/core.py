"""The estimate: a `MemoryPlan` in, the predicted peak per device out, in the seed's terms.

The number comes from tracing one steady-state training step (forward, loss, backward, clipping,
optimizer step) on fake tensors (`trace.py`): exact for every registered method and its options,
because the method is applied by its own `apply`. The breakdown shown to the user is the seed's:
weights, gradients, optimizer states, activations (logits and loss buffers included), overhead.
Options the CPU trace cannot run (8/4-bit base weights, 8-bit AdamW) swap in their byte counts
(`formulas.py`, each term cited there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lmtune import attention
from lmtune.errors import LmtuneError
from lmtune.memory import formulas
from lmtune.memory.tasks import SHAPES, TASKS
from lmtune.memory.trace import StepTrace, trace_step
from lmtune.models import GGUF_ERRORS
from lmtune.tasks import reference as ref

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
    preserve_kl: bool = False
    """data.preserve with a KL term: the step keeps full-vocabulary logits and runs a reference pass."""
    task: Literal["sft", "pretrain", "dpo", "simpo", "reward", "grpo"] = "sft"
    """What each micro-batch is: sft / pretrain rows; dpo, simpo, reward chosen + rejected pairs (dpo with a
    reference pass, reward through a scalar head); grpo `group_size` sampled completions per prompt
    (see tasks.py)."""
    group_size: int = 4
    """grpo: completions per prompt (grpo.group_size)."""
    max_new_tokens: int = 64
    """grpo: longest completion (grpo.max_new_tokens), after a prompt of up to `seq_len` tokens."""
    kl_beta: float = 0.04
    """grpo: KL weight (grpo.beta); not 0 means a reference, a frozen copy for full / freeze."""
    devices: int = 1
    """Data-parallel devices; each holds a replica (or, with sharding=fsdp, a shard) and `batch_size` sequences."""
    sharding: Literal["none", "fsdp"] = "none"
    """fsdp: weights, gradients and optimizer states split across `devices` (accelerate's FSDP plugin)."""
    device: Literal["cpu", "cuda"] = "cpu"
    clip_grad: bool = True
    trust_remote_code: bool = False
    token_ids: tuple[int, ...] | None = None
    """The distinct token ids the run's data holds; None: unknown (every row of the input embedding is read).
    A frozen input embedding that no LM head reads is paged in from the weights file where looked up
    (formulas.unread_embedding)."""


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
    phases: dict[str, int] = field(default_factory=dict)
    """Tensor bytes at the peak of each phase of the run (the training step; loading the model and sampling
    completions where they have a term); the largest is the peak."""

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
    except (OSError, KeyError, *GGUF_ERRORS) as err:
        raise LmtuneError(f"cannot read the config of model '{name}': {str(err).strip().splitlines()[0]}") from None


def estimate(plan: MemoryPlan) -> Estimate:
    """Predict the peak memory of `plan`'s training run on each device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmtune.models import position_limit
    from lmtune.tuned import apply

    _check(plan)
    converts = formulas.converts_gguf(plan.model)  # before the config is read: that converts the default model
    config = load_model_config(plan.model, plan.trust_remote_code)
    file_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # before the model sets it
    notes = []
    limit = position_limit(config)
    if limit is not None and plan.seq_len > limit:  # no run gets longer rows: check_lengths refuses them
        notes.append(f"sequence length {plan.seq_len} capped at the model's {limit} positions")
        plan = replace(plan, seq_len=limit)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(config, dtype=_WEIGHT_DTYPE[plan.precision],
                                                 trust_remote_code=plan.trust_remote_code)
        tuned = apply(attention.use(model), plan.method, base_name=plan.model)  # the attention training uses
        if not any(p.requires_grad for p in tuned.parameters()):
            raise LmtuneError("the method trains no parameter; nothing to estimate")
        if plan.quantization != "none" and tuned.method.saves_whole_model:
            raise LmtuneError(f"'{tuned.method.name}' trains base weights, which cannot be {plan.quantization}; "
                              "use lora (QLoRA) or another adapter method with a quantized base")
        if plan.gradient_checkpointing:
            _enable_checkpointing(model)
        shape = SHAPES[plan.task](plan, ref.can_switch_off(tuned))
        if shape.score_head:  # rl.reward_model.attach_head's Linear(hidden, 1), without its device move
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            tuned.reward_head = torch.nn.Linear(getattr(text, "hidden_size", None) or text.n_embd, 1)
        tuned.train()
        step = trace_step(tuned, shape, optimizer=plan.optimizer, autocast_dtype=_AUTOCAST.get(plan.precision),
                          foreach=plan.device == "cuda", clip=plan.clip_grad,
                          padded=not plan.packing and shape.rows > 1,  # one row is never padded: no mask
                          packed=plan.packing)
        trainable, total = tuned.trainable_parameters()
        swaps = formulas.swaps(tuned, plan)
        formulas.unread_embedding(swaps, model, plan, file_dtype, reads_head=not shape.score_head)
        if plan.sharding == "fsdp" and plan.devices > 1:
            from lmtune.memory.sharding import shard

            shard(swaps, tuned, step.weights + swaps.weights, step.gradients_at_peak + swaps.gradients,
                  step.optimizer + swaps.optimizer, plan.devices)
        phases = formulas.other_phases(tuned, plan, config, shape, step, swaps, converts, file_dtype)
    swaps.notes[:0] = notes
    return _breakdown(step, swaps, phases, plan, trainable, total)


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
    if plan.task not in TASKS:
        raise LmtuneError(f"unknown task '{plan.task}'; choose one of: {', '.join(TASKS)}")
    if plan.batch_size < 1 or plan.seq_len < 2 or plan.devices < 1 or plan.group_size < 1 or plan.max_new_tokens < 1:
        raise LmtuneError("batch size and devices must be >= 1 and the sequence length >= 2")
    if not 0.0 < plan.labelled_fraction <= 1.0:
        raise LmtuneError(f"labelled fraction must be in (0, 1] (got {plan.labelled_fraction})")


def _breakdown(step: StepTrace, swaps: formulas.Swaps, phases: dict[str, int], plan: MemoryPlan, trainable: int,
               total: int) -> Estimate:
    weights = step.weights + step.reference_weights + swaps.weights
    optimizer = step.optimizer + swaps.optimizer
    gradients = step.gradients_at_peak + swaps.gradients
    peak = (step.peak + step.reference_weights + swaps.weights + swaps.optimizer + swaps.gradients
            + swaps.activations)
    notes, phases = list(swaps.notes), {"training step": peak, **{k: v for k, v in phases.items() if v}}
    phase, other = max(phases.items(), key=lambda kv: kv[1])
    if other > peak:  # loading or sampling holds more than the training step: the run's peak is there
        notes.append(f"the peak is {phase} ({other / 2**30:.2f} GiB), above the training step's "
                     f"({peak / 2**30:.2f} GiB); activations here are that phase's transient memory")
        peak, gradients = other, 0
    activations = max(0, peak - weights - optimizer - gradients)
    overhead = formulas.overhead(plan.device, peak)
    per_device = peak + overhead
    return Estimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                    overhead=overhead, per_device=per_device, total=per_device * plan.devices,
                    trainable_params=trainable, total_params=total, saved_for_backward=step.saved_for_backward,
                    plan=_plan_dict(plan), notes=notes, phases=phases)


def _plan_dict(plan: MemoryPlan) -> dict:
    out = asdict(plan)
    out["token_ids"] = None if plan.token_ids is None else len(plan.token_ids)  # a count, for the report
    method = plan.method
    out["method"] = method.model_dump(mode="json") if hasattr(method, "model_dump") else method
    return out
