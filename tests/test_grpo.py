"""task grpo: the loss on a fixed batch (completions, advantages, old and reference log-probs) against TRL's
GRPOTrainer._compute_loss itself (the oracle, test-only) for both loss types we offer, gradients included;
group advantages by hand; training from a config with LoRA (reference = LoRA switched off) and full (a frozen
copy); the built-in rewards; a bad reward function as one line and exit 2."""

from __future__ import annotations

import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

import lmtune
from lmtune import rewards
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.data import Example, collate
from lmtune.data.format import IGNORE
from lmtune.errors import LmtuneError
from lmtune.rl.grpo import group_advantages, grpo_loss
from lmtune.train import run

PROMPT_LEN, COMPLETION_LENGTHS, TEMPERATURE = 5, [6, 3, 6, 1, 4, 6], 0.7


def _fixed_batch(seed: int = 0):
    """Two prompts x three completions; equal prompt lengths, so TRL's left-padded prompt + right-padded
    completion layout and ours (each row right-padded) put every real token at the same position."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 300, (2, PROMPT_LEN), generator=g).repeat_interleave(3, dim=0)
    width = max(COMPLETION_LENGTHS)
    completions = torch.randint(3, 300, (6, width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(COMPLETION_LENGTHS)[:, None]).long()
    completions = completions.masked_fill(mask == 0, 0)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
    noise = lambda: 0.3 * torch.randn((6, width), generator=g)  # noqa: E731 - moves ratios past the clip range
    return prompts, completions, mask, rewards, noise(), noise()


def _trl_loss(model, inputs: dict, beta: float, loss_type: str, epsilon: float) -> tuple[torch.Tensor, dict]:
    trl = pytest.importorskip("trl")

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **_):  # plain log-softmax at T
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1:-1]
        logps = F.log_softmax(logits.float() / TEMPERATURE, dim=-1)
        return logps.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1), torch.zeros_like(logps[..., 0]), None

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        max_completion_length=max(COMPLETION_LENGTHS),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction: x))
    loss = trl.GRPOTrainer._compute_loss(fake, model, inputs)
    return loss, fake._metrics["train"]


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("loss_type", "beta", "old"), [("dapo", 0.04, True), ("dapo", 0.0, False),
                                                          ("grpo", 0.1, True)])
def test_loss_and_gradients_equal_trl_grpo_trainer(loss_type, beta, old):
    tuned = lmtune.apply(build_model("llama"), {"name": "lora", "init": "random", "target_modules": "all-linear"})
    prompts, completions, mask, rewards, old_noise, ref_noise = _fixed_batch()
    advantages, _ = group_advantages(rewards, 3)
    input_ids = torch.cat([prompts, completions], dim=1)
    with torch.no_grad():
        logits = tuned(input_ids=input_ids, attention_mask=torch.cat([torch.ones_like(prompts), mask], 1)).logits
        current = F.log_softmax(logits[:, PROMPT_LEN - 1:-1].float() / TEMPERATURE, -1).gather(
            -1, completions[..., None]).squeeze(-1)
    old_logps, ref_logps = current + old_noise, current + ref_noise
    trl_inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
                  "completion_mask": mask, "advantages": advantages, "ref_per_token_logps": ref_logps,
                  "num_items_in_batch": mask.sum()}
    if old:
        trl_inputs["old_per_token_logps"] = old_logps
    trl_loss, trl_metrics = _trl_loss(tuned, trl_inputs, beta, loss_type, 0.2)
    trl_loss.backward()
    trl_grads = _grads(tuned)

    rows = [Example(p + c[:n], [IGNORE] * PROMPT_LEN + c[:n])
            for p, c, n in zip(prompts.tolist(), completions.tolist(), COMPLETION_LENGTHS, strict=True)]
    batch = {**collate(rows, 0), "advantages": advantages, "ref_logps": ref_logps[mask.bool()]}
    if old:
        batch["old_logps"] = old_logps[mask.bool()]
    if loss_type == "grpo":
        batch["loss_units"] = torch.tensor(len(rows))
    total, weight, metrics = grpo_loss(tuned, batch, epsilon=0.2, beta=beta, temperature=TEMPERATURE,
                                       loss_type=loss_type)
    assert int(weight) == (int(mask.sum()) if loss_type == "dapo" else len(rows))
    (total / weight).backward()
    ours = _grads(tuned)
    torch.testing.assert_close(total / weight, trl_loss, atol=1e-5, rtol=1e-5)
    assert ours.keys() == trl_grads.keys() and len(ours) > 0
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-4)
    if loss_type == "dapo":  # token means, like TRL's logged kl and clip ratio
        if beta:
            assert metrics["kl"] / float(weight) == pytest.approx(trl_metrics["kl"][0], rel=1e-5)
        assert metrics["clip_fraction"] / float(weight) == pytest.approx(trl_metrics["clip_ratio/region_mean"][0])
        assert (metrics["clip_fraction"] > 0) == old


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    advantages, std = group_advantages(rewards, 4)
    s = math.sqrt(1 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    expected = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-5)
    assert std.tolist() == pytest.approx([s] * 4 + [0] * 4, rel=1e-5)
    assert group_advantages(rewards, 4, scale=False)[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_builtin_rewards():
    done = ["The sum is 7.\nAnswer: 7", "Answer: 1,200.", "7", "Answer: 8 and more text"]
    assert rewards.answer_format(done) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.exact_match(done, answer=[7, "1200", 7, 8]) == [1.0, 1.0, 0.0, 1.0]
    assert rewards.length(["x" * 50, "x" * 100], target_length=[100, None]) == [-0.5, 0.0]


PROMPTS = [{"prompt": "What is two plus two?", "answer": "4"}, {"prompt": "Name three colors.", "answer": "3"},
           {"prompt": "Hello there", "answer": "0"}, {"prompt": "The capital of France?", "answer": "1"}]
REWARDS = textwrap.dedent('''
    def vowels(prompts, completions, answer, **_):
        assert len(answer) == len(completions) == len(prompts)
        return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
    def short(prompts, completions, **_):
        return [1.0]
    def boom(prompts, completions, **_):
        raise ValueError("no score today")
    def words(prompts, completions, **_):
        return ["good"] * len(completions)
''')


def _grpo(tmp_path, model_dir, name, *overrides):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    return [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / name}", "train.device=cpu",
            "data.cache=false", "task=grpo", "grpo.max_new_tokens=6", "grpo.group_size=4", "train.batch_size=2",
            *overrides]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_trains_from_config_and_raises_its_reward(tmp_path, model_dir, method, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    # The tiny model's logits are bounded by its small tied embedding: LoRA must reach the LM head to move them.
    lr = ["method.target_modules=[q_proj,v_proj,lm_head]", "train.lr=2e-2"] if method == "lora" else ["train.lr=5e-3"]
    summary = run(load_config(None, _grpo(tmp_path, model_dir, method, f"method={method}",
                                          "grpo.reward=my_rewards:vowels",
                                          f"data.eval={tmp_path / 'q.jsonl'}", "train.steps=30", "grpo.beta=0.04",
                                          "train.schedule=constant", "grpo.num_iterations=2", "grpo.group_size=8",
                                          *lr)))
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"reward", "reward_std", "kl", "clip_fraction", "completion_length"} <= set(steps[0])
    # The reference is the untrained policy: no divergence before the first update, some after.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[-1]["kl"] > 1e-3
    first, last = [r["reward"] for r in steps[:8]], [r["reward"] for r in steps[-8:]]
    assert sum(last) / 8 > sum(first) / 8 + 0.05
    assert {"eval_reward", "eval_completion_length"} <= set(summary["eval_start"]) and "eval_reward" in summary


@pytest.mark.parametrize(("reward", "message"), [
    ("no_such_module:f", "grpo.reward 'no_such_module:f': cannot import no_such_module (ModuleNotFoundError"),
    ("my_rewards:missing", "grpo.reward 'my_rewards:missing': my_rewards has no function missing"),
    ("my_rewards", "write it as module:function"),
    ("my_rewards:boom", "reward function my_rewards:boom raised ValueError: no score today"),
    ("my_rewards:short", "reward function my_rewards:short returned 1 values; it must return a list of 8 floats"),
    ("my_rewards:words", "reward function my_rewards:words returned 'good'; every reward must be a finite number"),
])
def test_a_bad_reward_function_is_one_line_and_exit_2(tmp_path, model_dir, monkeypatch, capsys, reward, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    args = _grpo(tmp_path, model_dir, "bad", f"grpo.reward={reward}", "train.steps=1")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmtune: error:")]  # besides the progress bar
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    if "import" in message or "no function" in message or "module:function" in message:
        assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_grpo_config_mistakes(tmp_path, model_dir):
    with pytest.raises(LmtuneError, match="grpo.group_size': must be >= 2"):
        load_config(None, ["data.train=x.jsonl", "task=grpo", "grpo.group_size=1"])
    with pytest.raises(LmtuneError, match="task grpo needs a reward"):
        run(load_config(None, _grpo(tmp_path, model_dir, "none")))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(LmtuneError, match="task grpo reads records with a 'prompt' field"):
        run(load_config(None, _grpo(tmp_path, model_dir, "x", "grpo.reward=lmtune.rewards:length",
                                    f"data.train={tmp_path / 'bad.jsonl'}")))


def test_example_configs_load_and_their_data_reads(tokenizer):
    from lmtune.data.pipeline import load_data
    from lmtune.data.prompts import load_prompts

    cfg = load_config("examples/grpo.yaml", ["data.cache=false"])
    assert cfg.task == "grpo" and len(cfg.grpo.reward) == 2
    train, evals, _ = load_prompts(cfg.data, tokenizer, cfg.train.seed)
    assert train and evals and all("answer" in r.fields for r in train)
    cfg = load_config("examples/reward.yaml", ["data.cache=false"])
    train, evals, stats = load_data(cfg.data, tokenizer, cfg.task, cfg.train.seed)
    assert cfg.task == "reward" and train and evals and stats.skipped_bad == 0


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_methods_train_with_grpo_and_reward(tmp_path, model_dir, method):
    """Generation and scoring go through the method's input hook; the reference is the prompt switched off."""
    common = [f"method={method}", "method.num_virtual_tokens=4", "train.steps=2"]
    summary = run(load_config(None, _grpo(tmp_path, model_dir, "g", "grpo.reward=lmtune.rewards:length",
                                          "grpo.beta=0.1", *common)))
    assert math.isfinite(summary["loss"])
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": "yes", "rejected": "no"}) + "\n"
                             for r in PROMPTS))
    summary = run(load_config(None, [f"model.name={model_dir}", f"data.train={pairs}", f"data.eval={pairs}",
                                     f"output_dir={tmp_path / 'r'}", "train.device=cpu", "data.cache=false",
                                     "task=reward", *common]))
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and math.isfinite(summary["eval_loss"])


def test_data_preview_shows_grpo_prompts_as_the_model_continues_them(tmp_path, model_dir, capsys):
    args = _grpo(tmp_path, model_dir, "p")
    assert main(["data", "preview", *[a for a in args if a.startswith(("data.", "model.", "task"))], "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 prompts" in out and '"answer": "4"' in out
    assert "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n" in out


def test_a_trained_reward_model_scores_the_completions(tmp_path, model_dir):
    from lmtune.checkpoint import load
    from lmtune.rl.reward_model import score_texts

    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": "yes", "rejected": "no"}) + "\n"
                             for r in PROMPTS))
    run(load_config(None, [f"model.name={model_dir}", f"data.train={pairs}", f"output_dir={tmp_path / 'rm'}",
                           "train.device=cpu", "data.cache=false", "task=reward", "train.steps=2"]))
    with pytest.raises(LmtuneError, match="holds no reward model"):
        run(load_config(None, _grpo(tmp_path, model_dir, "g0", f"grpo.reward_model={tmp_path}")))
    run(load_config(None, _grpo(tmp_path, model_dir, "g", f"grpo.reward_model={tmp_path / 'rm'}", "train.steps=1",
                                "grpo.group_size=2", "train.batch_size=1")))
    step = next(json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines())
    assert math.isfinite(step["reward"]) and step["reward"] != 0.0
    # Rewards sum: each function's value plus the reward model's score of the same (prompt, completion).
    from lmtune.config import GrpoConfig
    from lmtune.rl.reward_fns import Rewards

    rm, tokenizer = load(tmp_path / "rm")
    prompts, completions = ["Hello there", "Name three colors."], ["red", "It is four, I think."]
    total = Rewards(GrpoConfig(reward=["lmtune.rewards:length"], reward_model=str(tmp_path / "rm")))(
        prompts, completions, {})
    expected = [a + b for a, b in zip(rewards.length(completions), score_texts(rm, tokenizer, prompts, completions),
                                      strict=True)]
    assert total.tolist() == pytest.approx(expected, abs=1e-5)


def _positions(model_dir) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]


def test_completions_past_the_models_positions_are_refused_before_loading(tmp_path, model_dir, capsys):
    limit = _positions(model_dir)  # the oracle: the model's own config
    code = main(["train", *_grpo(tmp_path, model_dir, "long", f"grpo.max_new_tokens={limit}",
                                 "grpo.reward=lmtune.rewards:answer_format")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"grpo.max_new_tokens={limit} leaves no room" in err and f"{limit} positions" in err
    assert not (tmp_path / "long").exists()


def test_prompt_plus_completion_past_the_models_positions_is_refused(tmp_path, model_dir, capsys):
    limit = _positions(model_dir)
    tokens = max(len(r["prompt"].split()) for r in PROMPTS)  # every prompt has at least one token a word
    code = main(["train", *_grpo(tmp_path, model_dir, "long", f"grpo.max_new_tokens={limit - tokens + 1}",
                                 "grpo.reward=lmtune.rewards:answer_format", "force=true")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "grpo.max_new_tokens<=" in err
    assert not (tmp_path / "long").exists()


def test_a_huge_group_is_refused_by_the_preflight_with_the_group_size_to_lower(tmp_path, model_dir, capsys):
    code = main(["train", *_grpo(tmp_path, model_dir, "huge", "grpo.group_size=100000000",
                                 "grpo.reward=lmtune.rewards:answer_format")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "grpo.group_size=50000000" in err and "GiB" in err
    assert not (tmp_path / "huge").exists()
