"""What each task's training step looks like to the memory trace: rows, length, loss path, reference.

One entry per task (the registry `SHAPES`), read from lmtune's own objectives:
- sft / pretrain: `batch_size` rows through the LM head on their labelled positions.
- dpo: chosen + rejected rows; the reference is the same model with the method switched off, run after the
  policy's forward while its graph is alive (`objectives.dpo_loss`). Methods that cannot switch off (full,
  freeze) get their reference log-probs once, before training (`train.attach_reference_logps`): nothing in
  the step, no copy of the weights.
- simpo: chosen + rejected, no reference.
- reward: chosen + rejected through the body only (no LM head) and a Linear(hidden, 1) score head
  (`rl.reward_model`).
- grpo: `group_size` completions per prompt, each up to `max_new_tokens` after a prompt of up to
  `seq_len`; loss on the completion tokens. The reference (KL beta != 0) is the switched-off model, run at
  sampling time (no graph alive), or for full / freeze a frozen deep copy of the policy held for the whole
  run (`rl.rollout.Rollouts`). Sampling runs first, with the KV cache of every completion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepShape:
    """One micro-batch of a task, as the trace runs it."""

    rows: int
    seq_len: int
    labelled: int
    """Positions per row that go through the LM head."""
    reference: str | None = None
    """None, or "switch" (a no-grad pass of the model with its method off, inside the step)."""
    copy_weights: bool = False
    """A frozen copy of the weights is held all run (GRPO with full / freeze)."""
    score_head: bool = False
    """Reward model: a scalar head on the last real token instead of the LM head."""
    generation_tokens: int = 0
    """Tokens of KV cache held while sampling (rows x (prompt + completion)); 0: no sampling phase."""
    kl_rows: int = 0
    """data.preserve.kl: rows of the guard's answers (all of them, the worst case) scored against the reference
    with full-vocabulary logits; 0: the plain objective."""


def _labelled(plan, seq_len: int) -> int:
    fraction = 1.0 if plan.packing else plan.labelled_fraction
    return max(1, round(fraction * (seq_len - 1)))


def _lm(plan, switches: bool) -> StepShape:
    kl = plan.task == "sft" and getattr(plan, "preserve_kl", False)
    return StepShape(plan.batch_size, plan.seq_len, _labelled(plan, plan.seq_len),
                     kl_rows=plan.batch_size if kl else 0, copy_weights=kl and not switches)


def _dpo(plan, switches: bool) -> StepShape:
    return StepShape(2 * plan.batch_size, plan.seq_len, _labelled(plan, plan.seq_len),
                     reference="switch" if switches else None)


def _simpo(plan, switches: bool) -> StepShape:
    return StepShape(2 * plan.batch_size, plan.seq_len, _labelled(plan, plan.seq_len))


def _reward(plan, switches: bool) -> StepShape:
    return StepShape(2 * plan.batch_size, plan.seq_len, 0, score_head=True)


def _grpo(plan, switches: bool) -> StepShape:
    # The reference log-probs are taken at sampling time, with no graph alive: not inside the step.
    rows, length = plan.batch_size * plan.group_size, plan.seq_len + plan.max_new_tokens
    return StepShape(rows, length, plan.max_new_tokens, copy_weights=plan.kl_beta != 0.0 and not switches,
                     generation_tokens=rows * length)


SHAPES: dict[str, Callable] = {"sft": _lm, "pretrain": _lm, "dpo": _dpo, "simpo": _simpo, "reward": _reward,
                               "grpo": _grpo}
TASKS = tuple(SHAPES)
