"""Runs as the studio sees them: `lmtune train` processes it launches (the page stays responsive), stops
cleanly (SIGINT: the step finishes and its checkpoint is saved), watches through their files, compares and
chats with. Every run is a directory; a run started elsewhere shows up too."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

import lmtune
from lmtune.checkpoint import RUN_INFO
from lmtune.config import RunConfig
from lmtune.errors import LmtuneError
from lmtune.resume import checkpoints
from lmtune.runlock import LOCK

LOG = "train.log"  # what the launched process prints, next to its results


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            break
    return rows


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _locked(out: Path) -> bool:
    """Whether a live process holds the run's lock (the kernel drops it when the process dies)."""
    try:
        with (out / LOCK).open("r") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    """The end of the log as a terminal would show it: progress bars redraw with \\r, keep their last state."""
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
        text = f.read().decode(errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines:])


class Runs:
    """The runs under `root` and the processes this studio started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._procs: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def launch(self, cfg: RunConfig, overrides: list[str]) -> Path:
        """Start `lmtune train` with the form's overrides as a separate process; its output goes to train.log."""
        from lmtune.studio.forms import FieldErrors

        out = Path(cfg.output_dir).resolve()
        if self.status(out)["status"] == "running":
            raise FieldErrors([("output_dir", f"{cfg.output_dir} is in use by a running run; stop it or choose "
                                              "another output_dir")])
        if (out / RUN_INFO).exists() and not cfg.overwrite:
            raise FieldErrors([("output_dir", f"{cfg.output_dir} already holds a finished run; choose another "
                                              "output_dir or tick overwrite")])
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(lmtune.__file__).parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with (out / LOG).open("w") as log:
            # Its own session: a Ctrl-C that ends the studio does not stop the runs it started.
            proc = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "train", *overrides], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        with self._lock:
            self._procs[out] = proc
        return out

    def stop(self, out: Path) -> None:
        """Ask a run to stop: it finishes its step, saves a checkpoint (resumable) and exits."""
        with self._lock:
            proc = self._procs.get(out.resolve())
        if proc is not None and proc.poll() is None:
            return proc.send_signal(signal.SIGINT)
        if not _locked(out):  # a run started elsewhere holds the lock and wrote its pid into it
            raise LmtuneError(f"{out} is not running")
        os.kill(int((out / LOCK).read_text().split()[0]), signal.SIGINT)

    def status(self, out: Path) -> dict[str, Any]:
        out = out.resolve()
        with self._lock:
            proc = self._procs.get(out)
        code = None if proc is None else proc.poll()
        if (proc is not None and code is None) or (proc is None and _locked(out)):
            state = "running"
        elif (out / RUN_INFO).is_file() and code in (None, 0):
            state = "finished"
        elif code == 130 or (code is None and checkpoints(out)):
            state = "stopped"
        else:
            state = "failed" if code else "incomplete"
        log = _log_tail(out / LOG)
        errors = [line for line in log.splitlines() if line.startswith(("lmtune: error", "lmtune: stopped"))]
        progress = re.findall(r"\| *(\d+)/(\d+) \[", log)
        return {"dir": str(out), "name": self.name(out), "status": state, "returncode": code, "log": log,
                "message": errors[-1] if errors else "", "rows": _rows(out / "metrics.jsonl"),
                "progress": [int(x) for x in progress[-1]] if progress else None,
                "checkpoints": [p.name for p in checkpoints(out)]}

    def name(self, out: Path) -> str:
        try:
            return str(out.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(out)

    def listing(self) -> list[dict[str, str]]:
        """Every run directory under the root (two levels deep) and every run started here, newest first."""
        found = {p.parent.resolve() for pattern in ("*/metrics.jsonl", "*/*/metrics.jsonl", f"*/{LOG}")
                 for p in self.root.glob(pattern)} if self.root.is_dir() else set()
        with self._lock:
            found |= set(self._procs)
        found = sorted(found, key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
        return [{"dir": str(p), "name": self.name(p), "status": self.status(p)["status"]} for p in found]

    def compare_row(self, out: Path) -> dict[str, Any]:
        """What the compare table shows of one run, from the files `lmtune train` writes."""
        summary, config, rows = _json(out / "summary.json"), _config(out), _rows(out / "metrics.jsonl")
        if not summary:  # a run that has not finished: what its log and metrics say so far
            summary = _unfinished(out, rows)
        method = config.get("method")
        steps, seconds = summary.get("steps"), summary.get("train_seconds")
        return {"name": self.name(out), "dir": str(out.resolve()), "status": self.status(out)["status"],
                "method": method.get("name") if isinstance(method, dict) else method,
                "model": (config.get("model") or {}).get("name") or "(default)",
                "trainable_params": summary.get("trainable_params"), "total_params": summary.get("total_params"),
                "steps": steps, "s_per_step": seconds / steps if steps and seconds else None,
                "loss": summary.get("loss"), "eval_loss": summary.get("eval_loss"), "rows": rows}


def _unfinished(out: Path, rows: list[dict]) -> dict:
    """Parameter counts from the run's log (`TunedModel.describe_parameters`), the last logged losses."""
    found = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", _log_tail(out / LOG, 400))
    counts = {"trainable_params": int(found.group(1).replace(",", "")),
              "total_params": int(found.group(2).replace(",", ""))} if found else {}
    train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    return {**counts, **({"steps": train[-1]["step"], "loss": train[-1]["loss"]} if train else {}),
            **({"eval_loss": evals[-1]["eval_loss"]} if evals else {})}


def _config(out: Path) -> dict:
    try:
        return yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


class Chat:
    """A finished run and its base model, loaded once each, answering the same conversation side by side."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _get(self, kind: str, name: str):
        from lmtune.checkpoint import load
        from lmtune.models import load_model
        from lmtune.tuned import apply

        if (kind, name) not in self._models:
            if kind == "run":
                self._models[kind, name] = load(name)
            else:
                model, tokenizer = load_model(name or None)
                self._models[kind, name] = apply(model, "full", base_name=name or None), tokenizer
        return self._models[kind, name]

    def reply(self, run_dir: Path, history: dict[str, list[dict[str, str]]], max_new_tokens: int) -> dict[str, str]:
        """`history`: the conversation each side has had ("run", "base"), ending with the new user message."""
        from lmtune.inference import reply

        info = _json(run_dir / RUN_INFO)
        if not info:
            raise LmtuneError(f"{run_dir} holds no finished run to chat with; pick a finished run")
        with self._lock:  # one generation at a time: they share the CPU
            answers = {}
            for kind, name in (("run", str(run_dir.resolve())), ("base", info.get("base_model") or "")):
                tuned, tokenizer = self._get(kind, name)
                messages = history[kind]
                if not tokenizer.chat_template:  # plain text models continue the last message
                    messages = messages[-1]["content"]
                answers[kind] = reply(tuned, tokenizer, messages, max_new_tokens)
        return answers
