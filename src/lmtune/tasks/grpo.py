"""GRPO (Shao et al. 2024): reinforcement learning from `{"prompt", ...}` records and the rewards in `grpo:`.

Its micro-batches are sampled completions of the prompt batches (`rl/rollout.py`), rewarded by the functions
and / or reward model (`rl/reward_fns.py`), with the loss of `rl/grpo.py`; the reference for the KL term is the
model with its method switched off, or a frozen copy (`tasks.reference`). Eval reports the reward of greedy
completions of the held-out prompts.
"""

from __future__ import annotations

import functools

from lmtune.data.prompts import collate_prompts, load_prompts, preview_prompts
from lmtune.rl.grpo import grpo_loss
from lmtune.rl.reward_fns import Rewards
from lmtune.rl.rollout import rollout_loaders
from lmtune.tasks import Task, register


def _objective(cfg):
    g = cfg.grpo
    return functools.partial(grpo_loss, epsilon=g.epsilon, beta=g.beta, temperature=g.temperature,
                             loss_type=g.loss_type)


def _load(cfg, tokenizer):
    Rewards(cfg.grpo)  # a reward that cannot be imported fails here, before anything is written
    return load_prompts(cfg.data, tokenizer, cfg.train.seed)


def _greedy_reward(model, loader, objective, device) -> dict[str, float]:
    return loader.score(model)  # the eval loader is rollout.GreedyEval: it scores the model itself


register(Task(
    name="grpo", summary="reinforcement learning from prompt records and the rewards in grpo:; eval reports the "
    "reward of greedy completions",
    objective=_objective, section="grpo", load=_load, collate=lambda cfg, pad_id: collate_prompts,
    eval_row=_greedy_reward, reference="samples", loaders=rollout_loaders, one_process=True,
    preview=lambda cfg, tokenizer, count: preview_prompts(cfg.data, tokenizer, count)))
