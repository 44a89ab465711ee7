"""A reward model: the base model (any method on its body) plus a scalar head that always trains, learned from
preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin); eval reports the
held-out pair accuracy. The head is saved beside the method's weights (`reward_head.safetensors`)."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from lmtune.checkpoint import load
from lmtune.errors import LmtuneError
from lmtune.rl.reward_model import HEAD_FILE, attach_head, reward_loss, score_texts
from lmtune.tasks import Task, register


def score_run(run_dir: str | Path, prompt: str, response: str) -> float:
    """`lmtune reward`: a saved reward model's score of one response, rendered as its training data was."""
    d = Path(run_dir)
    if d.is_dir() and not (d / HEAD_FILE).is_file():
        raise LmtuneError(f"{d} holds no reward model (no {HEAD_FILE}); train one with task: reward")
    tuned, tokenizer = load(d)
    prompt_format = "auto"
    if (d / "config.yaml").is_file():
        prompt_format = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("data", {}).get(
            "prompt_format", "auto")
    return score_texts(tuned, tokenizer, [prompt], [response], prompt_format)[0]


register(Task(
    name="reward", summary="a reward model: a scalar head trained on preference pairs, Bradley-Terry loss; eval "
    "reports pair accuracy",
    objective=lambda cfg: functools.partial(reward_loss, margin=cfg.preference.margin), section="preference",
    records="pairs", prepare_model=attach_head, one_process=True))
