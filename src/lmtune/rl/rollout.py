"""GRPO rollouts: sample a group of completions per prompt, score them, and hand the training loop ready
micro-batches (completions as labels, advantages, old / reference log-probs). The loop stays the one loop:
`Rollouts` is the iterable it draws micro-batches from, `GreedyEval` what it evaluates with."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lmtune.config import GrpoConfig
from lmtune.data import Example, collate
from lmtune.data.format import IGNORE
from lmtune.data.prompts import PromptRow
from lmtune.rl.grpo import group_advantages, token_logps
from lmtune.rl.reward_fns import Rewards
from lmtune.tasks import reference


def _left_padded(rows: list[PromptRow], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
        mask[i, width - len(r.input_ids):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _stop_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def sample(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[PromptRow], cfg: GrpoConfig,
           greedy: bool = False) -> list[list[int]]:
    """Completion token ids, `group_size` per prompt (one when greedy), up to and including the first stop token."""
    tuned = getattr(model, "module", model)
    device = next(tuned.parameters()).device
    inputs = _left_padded(rows, tokenizer.pad_token_id, device)
    settings = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else {
        "do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0,
        "num_return_sequences": cfg.group_size}
    was_training = tuned.training
    tuned.eval()
    out = tuned.generate(**inputs, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         use_cache=True, **settings)
    tuned.train(was_training)
    stops, completions = _stop_ids(tokenizer, tuned.model), []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:end])
    return completions


def _fields(rows: list[PromptRow], repeat: int) -> dict[str, list]:
    keys = sorted({k for r in rows for k in r.fields})
    return {k: [r.fields.get(k) for r in rows for _ in range(repeat)] for k in keys}


def score(rows: list[PromptRow], completions: list[list[int]], tokenizer: PreTrainedTokenizerBase,
          rewards: Rewards) -> torch.Tensor:
    """The reward of each completion (rows' completions consecutive), from the decoded text."""
    repeat = len(completions) // len(rows)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    prompts = [r.prompt for r in rows for _ in range(repeat)]
    return rewards(prompts, texts, _fields(rows, repeat))


class Rollouts:
    """Endless-loop-friendly iterable of GRPO micro-batches, one pass over the prompts per iteration.

    Each optimizer step's `grad_accum` prompt batches are sampled and scored first, then yielded
    `num_iterations` times; their old log-probs are taken before the first step on them.
    """

    def __init__(self, prompts: DataLoader, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: GrpoConfig,
                 rewards: Rewards, grad_accum: int) -> None:
        self.prompts, self.policy, self.tokenizer, self.cfg = prompts, policy, tokenizer, cfg
        self.rewards, self.grad_accum = rewards, grad_accum
        # Methods that change the base weights (full, freeze) need the untrained model kept as the reference.
        self.frozen = None
        if cfg.beta != 0.0 and reference.kind(policy, cacheable=False) == "copy":
            self.frozen = reference.frozen_copy(policy)

    def __len__(self) -> int:
        return len(self.prompts) * self.cfg.num_iterations

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        chunk: list[dict[str, torch.Tensor]] = []
        for rows in self.prompts:
            chunk.append(self.rollout(rows))
            if len(chunk) == self.grad_accum:
                yield from self._repeat(chunk)
                chunk = []
        yield from self._repeat(chunk)

    def _repeat(self, chunk: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.cfg.num_iterations):
            yield from chunk

    @torch.no_grad()
    def rollout(self, rows: list[PromptRow]) -> dict[str, torch.Tensor]:
        """One micro-batch: completions of every prompt, right-padded after their prompt, with advantages."""
        cfg, tuned = self.cfg, getattr(self.policy, "module", self.policy)
        completions = sample(tuned, self.tokenizer, rows, cfg)
        rewards = score(rows, completions, self.tokenizer, self.rewards)
        advantages, group_std = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        prompts = [r.input_ids for r in rows for _ in range(cfg.group_size)]
        examples = [Example(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompts, completions, strict=True)]
        device = next(tuned.parameters()).device
        batch = {k: v.to(device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}
        batch.update(advantages=advantages.to(device), rewards=rewards.to(device), group_std=group_std.to(device))
        if cfg.loss_type == "grpo":
            batch["loss_units"] = torch.tensor(len(examples))
        was_training = tuned.training
        tuned.eval()
        if cfg.num_iterations > 1:
            batch["old_logps"] = token_logps(tuned, batch, cfg.temperature)
        if cfg.beta != 0.0:
            if self.frozen is not None:
                batch["ref_logps"] = token_logps(self.frozen, batch, cfg.temperature)
            else:
                with reference.switched_off(tuned):
                    batch["ref_logps"] = token_logps(tuned, batch, cfg.temperature)
        tuned.train(was_training)
        return batch


class GreedyEval:
    """Held-out evaluation of a policy: the mean reward of its greedy completions of the eval prompts."""

    def __init__(self, prompts: list[PromptRow], tokenizer: PreTrainedTokenizerBase, cfg: GrpoConfig,
                 rewards: Rewards, batch_size: int) -> None:
        self.prompts, self.tokenizer, self.cfg, self.rewards = prompts, tokenizer, cfg, rewards
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.prompts) / self.batch_size)

    def score(self, model: nn.Module) -> dict[str, float]:
        """eval_reward (mean), its std, each reward's mean when there are several, completion length, seconds."""
        started, rewards, lengths, parts = time.perf_counter(), [], [], {}
        for start in range(0, len(self.prompts), self.batch_size):
            rows = self.prompts[start:start + self.batch_size]
            completions = sample(model, self.tokenizer, rows, self.cfg, greedy=True)
            rewards += score(rows, completions, self.tokenizer, self.rewards).tolist()
            lengths += [len(c) for c in completions]
            for name, values in self.rewards.parts.items():
                parts.setdefault(name, []).extend(values)
        values = torch.tensor(rewards)
        row = {"eval_reward": float(values.mean()), "eval_reward_std": float(values.std()) if len(rewards) > 1
               else 0.0}
        if len(parts) > 1:
            row.update({f"eval_reward/{name}": sum(v) / len(v) for name, v in parts.items()})
        row["eval_completion_length"] = sum(lengths) / len(lengths)
        row["eval_seconds"] = time.perf_counter() - started
        return row


def rollout_loaders(cfg, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: DataLoader,
                    eval_prompts: list[PromptRow]) -> tuple[Rollouts, GreedyEval | None]:
    """task grpo: the training loop's micro-batches and its evaluation, from the prompt loader and eval prompts."""
    device = next(policy.parameters()).device
    rewards = Rewards(cfg.grpo, device)
    loader = Rollouts(prompts, policy, tokenizer, cfg.grpo, rewards, cfg.train.grad_accum)
    evaluation = GreedyEval(eval_prompts, tokenizer, cfg.grpo, rewards, cfg.train.batch_size) if eval_prompts else None
    return loader, evaluation
