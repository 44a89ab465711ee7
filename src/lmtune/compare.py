"""`lmtune compare`: every method trained on the same data and step budget, then one report.

Each method is an ordinary `lmtune train` run in its own process (so that its peak memory is its own), on
the config given, with the method swapped in and a per-method starting point (`METHOD_DEFAULTS`: learning
rates differ by orders of magnitude between methods). The config's own `methods:` section, or
`methods.<name>.<key>=value` overrides, change any key for one method, e.g. `methods.lora.train.lr=5e-4` or
`methods.freeze.method.last_n_layers=2`. Afterwards each run is scored on the first `data.eval` file by
the eval code (task accuracy: exact answers for prompt/answer data, preference accuracy for pairs), as is
the untuned base model, and `report.md`, `report.json`, `eval_loss.png` and `methods.png` are written.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmtune.checkpoint import load
from lmtune.config import RunConfig, apply_override, dump_config, load_raw, validate
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError
from lmtune.evaluation import DEFAULT_NORMALIZE, data_kind, evaluate_file, on_device
from lmtune.methods import method_names
from lmtune.models import load_model
from lmtune.plots import plot_bars, plot_curves
from lmtune.train import run
from lmtune.tuned import apply

log = logging.getLogger("lmtune")

TAXONOMY = ["full", "freeze", "lora", "ia3", "adapter", "prompt", "p-tuning", "prefix", "p-tuning-v2"]
# Where each method starts (dotted keys, as overrides): rates as each method's paper or PEFT's examples
# suggest for a ~100M model; prompt methods need rates 10-100x LoRA's.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"train.lr": 5e-5},
    "freeze": {"train.lr": 2e-4, "method.last_n_layers": 4},
    "lora": {"train.lr": 1e-3},
    "ia3": {"train.lr": 1e-2},
    "adapter": {"train.lr": 1e-3},
    "prompt": {"train.lr": 3e-2},
    "p-tuning": {"train.lr": 1e-2},
    "prefix": {"train.lr": 1e-3},
    "p-tuning-v2": {"train.lr": 1e-2},
}
EVAL_POINTS = 8  # eval-loss measurements per run when the config sets no train.eval_every


def default_methods() -> list[str]:
    known = method_names()
    return [m for m in TAXONOMY if m in known] + [m for m in known if m not in TAXONOMY]


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def method_configs(config: str | Path | None, overrides: list[str], methods: list[str], steps: int | None,
                   out: Path) -> dict[str, RunConfig]:
    """One validated run config per method; every mistake surfaces here, before anything trains."""
    raw = load_raw(config, overrides)
    per_method = raw.pop("methods", None) or {}
    if not isinstance(per_method, dict):
        raise LmtuneError("config: 'methods' must map method names to config sections, e.g. methods: {lora: "
                          "{train: {lr: 1e-3}}}")
    known = method_names()
    for name in [*methods, *per_method]:
        if name not in known:
            raise LmtuneError(f"unknown method '{name}'; choose from {', '.join(known)}")
    for name in per_method:
        if name not in methods:
            raise LmtuneError(f"config: 'methods.{name}' is set but {name} is not compared (--methods)")
    return {name: _method_config(raw, name, per_method.get(name) or {}, steps, out) for name in methods}


def _method_config(raw: dict, name: str, extra: Any, steps: int | None, out: Path) -> RunConfig:
    """The shared config with the method, its defaults, the step budget and its own overrides, validated."""
    run = copy.deepcopy(raw)
    own = raw.get("method")  # the config's own method keeps its options
    run["method"] = dict(own) if isinstance(own, dict) and own.get("name") == name else {"name": name}
    for key, value in METHOD_DEFAULTS.get(name, {}).items():
        apply_override(run, f"{key}={value}")
    if steps is not None:
        apply_override(run, f"train.steps={steps}")
    if not isinstance(extra, dict):
        raise LmtuneError(f"config: 'methods.{name}' must be a mapping of config keys")
    _deep_update(run, extra)
    run.update(output_dir=str(out / name), overwrite=True, resume="never")
    try:
        cfg = validate(run)
    except LmtuneError as err:
        raise LmtuneError(f"{err} (for method {name})") from None
    if cfg.train.steps is None:
        raise LmtuneError("compare gives every method the same step budget: set --steps or train.steps")
    if cfg.data.eval is None and cfg.data.eval_split == 0:
        raise LmtuneError("compare needs eval data for its loss curves and accuracy: set data.eval (a file) "
                          "or data.eval_split")
    if cfg.train.eval_every is None:
        cfg.train.eval_every = max(1, cfg.train.steps // EVAL_POINTS)
    return cfg


def _train_in_process(cfg: RunConfig) -> str | None:
    try:
        run(cfg)
    except LmtuneError as err:
        return f"lmtune: error: {err}"
    return None


def _train_in_subprocess(path: Path, logfile: Path) -> str | None:
    with logfile.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "lmtune.cli", "train", str(path)], stdout=f,
                              stderr=subprocess.STDOUT, text=True)
    lines = logfile.read_text().splitlines()
    return None if done.returncode == 0 else (lines[-1] if lines else f"exit {done.returncode}")


def train_each(configs: dict[str, RunConfig], out: Path, separate: bool = True) -> dict[str, str | None]:
    """`lmtune train` per method, each in its own process unless not `separate`; the error line of each
    that failed (None: it finished)."""
    failures: dict[str, str | None] = {}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for i, (name, cfg) in enumerate(configs.items(), start=1):
        path = out / "configs" / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        log.info("compare: [%d/%d] training %s (lr %g, %d steps)", i, len(configs), name, cfg.train.lr,
                 cfg.train.steps)
        started = time.perf_counter()
        failures[name] = _train_in_subprocess(path, out / "configs" / f"{name}.log") if separate \
            else _train_in_process(cfg)
        log.info("compare: %s %s in %.0f s", name, "finished" if failures[name] is None else
                 f"FAILED ({failures[name]})", time.perf_counter() - started)
    return failures


def _task_scores(tuned, tokenizer, cfg: RunConfig, max_new_tokens: int | None,
                 normalize: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy of the model on the first data.eval file (none when eval data is a split of the training data)."""
    if not cfg.data.eval:
        return {}
    path = cfg.data.eval[0].path
    kind = data_kind(read_records(path), path)
    metric = {"answer": "accuracy", "preference": "preference_accuracy"}.get(kind)
    if metric is None:
        return {}
    result = evaluate_file(tuned, tokenizer, path, [metric], cfg.data, normalize, max_new_tokens)
    return {"task_metric": metric, "task_score": result["metrics"][metric], "task_data": path}


def score_untuned(cfg: RunConfig, max_new_tokens: int | None, normalize: tuple[str, ...]) -> dict[str, Any]:
    """The base model as it is: eval loss on the eval data and task accuracy, for the first row."""
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code)
    tuned = on_device(apply(model, "full", base_name=cfg.model.name))
    row: dict[str, Any] = {"method": "untuned", "trainable": 0, "total": sum(p.numel() for p in model.parameters())}
    if cfg.data.eval:
        loss = evaluate_file(tuned, tokenizer, cfg.data.eval[0].path, ["loss"], cfg.data)["metrics"]["loss"]
        row["eval_loss_end"] = row["eval_loss_start"] = loss
    return {**row, **_task_scores(tuned, tokenizer, cfg, max_new_tokens, normalize)}


def score_run(name: str, cfg: RunConfig, max_new_tokens: int | None, normalize: tuple[str, ...],
              separate: bool = True) -> dict[str, Any]:
    """A finished run's row: parameters, memory, speed, eval-loss curve (from its own files) and task accuracy."""
    out = Path(cfg.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    if not separate and summary.get("peak_memory_of") == "process RSS":  # shared by every run in the process
        summary.pop("peak_memory_bytes")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    step_seconds = [r["step_seconds"] for r in rows if "step_seconds" in r]
    tuned, tokenizer = load(out)
    row = {"method": name, "lr": cfg.train.lr, "trainable": summary["trainable_params"],
           "total": summary["total_params"], "peak_memory_bytes": summary.get("peak_memory_bytes"),
           "peak_memory_of": summary.get("peak_memory_of"),
           "s_per_step": statistics.median(step_seconds) if step_seconds else None,
           "train_loss_end": summary.get("loss"), "eval_curve": curve,
           "eval_loss_start": curve[0][1] if curve else None, "eval_loss_end": curve[-1][1] if curve else None}
    return {**row, **_task_scores(on_device(tuned), tokenizer, cfg, max_new_tokens, normalize)}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report_markdown(rows: list[dict], cfg: RunConfig, steps: int, failures: dict[str, str | None]) -> str:
    metric = next((r["task_metric"] for r in rows if "task_metric" in r), None)
    task_data = next((r["task_data"] for r in rows if "task_data" in r), None)
    memory_of = next((r["peak_memory_of"] for r in rows if r.get("peak_memory_of")), "")
    t = cfg.train
    lines = [
        "# Method comparison", "",
        f"Model {cfg.model.name or 'SmolLM2-135M-Instruct (default)'}, task {cfg.task}, training data "
        f"{', '.join(s.path for s in cfg.data.train)}, eval data "
        f"{', '.join(s.path for s in cfg.data.eval) if cfg.data.eval else f'{cfg.data.eval_split:.0%} held out'}. "
        f"Every method: {steps} steps of batch {t.batch_size} x {t.grad_accum} accumulation, {t.schedule} "
        f"schedule, warm-up {t.warmup_steps}, seed {t.seed}, precision {t.precision}; learning rates per method "
        "(column lr).", "",
        f"| method | lr | trainable params | % of model | peak memory ({memory_of}) | s / step (median) "
        f"| eval loss start -> end | {metric or 'task score'} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = 100 * r["trainable"] / r["total"] if r.get("total") else 0.0
        memory = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r.get("peak_memory_bytes") else ""
        lr = _fmt(r.get("lr"), "g") if r["method"] != "untuned" else ""
        sps = _fmt(r.get("s_per_step"), ".2f") if r["method"] != "untuned" else ""
        loss = f"{_fmt(r.get('eval_loss_start'), '.3f')} -> {_fmt(r.get('eval_loss_end'), '.3f')}"
        lines.append(f"| {r['method']} | {lr} | {r['trainable']:,} | {pct:.3f} | {memory} | {sps} | {loss} | "
                     f"{_fmt(r.get('task_score'), '.2f')} |")
    for name, error in failures.items():
        if error is not None:
            lines.append(f"| {name} | failed: {error} | | | | | | |")
    if metric:
        lines += ["", f"{metric}: on {task_data}, by `lmtune eval` (greedy answers; see its --help)."]
    lines += ["", "![eval loss](eval_loss.png)", "", "![accuracy and parameters](methods.png)", ""]
    return "\n".join(lines)


def write_report(rows: list[dict], cfg: RunConfig, steps: int, failures: dict[str, str | None], out: Path) -> None:
    (out / "report.json").write_text(json.dumps({"rows": rows, "failed": failures}, indent=2))
    trained = [r for r in rows if r["method"] != "untuned"]
    plot_curves({r["method"]: r["eval_curve"] for r in trained}, out / "eval_loss.png", log=True)
    names = [r["method"] for r in rows]
    metric = next((r["task_metric"] for r in rows if "task_metric" in r), "task score")
    plot_bars(names, {metric: [r.get("task_score") for r in rows],
                      "trainable parameters (% of model, log)": [100 * r["trainable"] / r["total"] or None
                                                                  for r in rows]},
              out / "methods.png", log=("trainable parameters (% of model, log)",))
    (out / "report.md").write_text(report_markdown(rows, cfg, steps, failures))


def compare(config: str | Path | None, overrides: list[str], methods: list[str] | None = None,
            steps: int | None = None, out: str | Path = "runs/compare", max_new_tokens: int | None = None,
            normalize: tuple[str, ...] | None = None, separate: bool = True) -> list[dict]:
    """Train every method, score each and the untuned model, write the report; returns its rows.

    `separate`: each run in its own process (its peak memory is its own); else all in this one (faster to
    start; on the CPU, peak memory is then not reported, as the process's peak belongs to no single run)."""
    normalize = DEFAULT_NORMALIZE if normalize is None else normalize
    out = Path(out)
    configs = method_configs(config, overrides, methods or default_methods(), steps, out)
    first = next(iter(configs.values()))
    failures = train_each(configs, out, separate)
    rows = [score_untuned(first, max_new_tokens, normalize)]
    for name, cfg in configs.items():
        if failures[name] is None:
            rows.append(score_run(name, cfg, max_new_tokens, normalize, separate))
            log.info("compare: %s scored: %s", name, json.dumps({k: v for k, v in rows[-1].items()
                                                                 if k != "eval_curve"}))
    write_report(rows, first, first.train.steps, failures, out)
    return rows
