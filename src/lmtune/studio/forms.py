"""The configure form's server side: the schema the page builds its form from, form values -> `RunConfig` with
every error tied to its field, YAML in and out, and the live memory estimate."""

from __future__ import annotations

import re
import threading
from typing import Any

import yaml
from pydantic import ValidationError

from lmtune.config import RunConfig, apply_override, parse_yaml
from lmtune.errors import LmtuneError
from lmtune.methods import get_method, method_names
from lmtune.schema import error_key, error_message

GIB = 2**30
NO_DATA = "(not read by the estimate)"


class FieldErrors(Exception):
    """Form input that does not make a valid config: (dotted key or "", message) pairs, every one at once."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in errors))
        self.errors = errors


def schema() -> dict:
    """`RunConfig`'s JSON schema and each method's; the page generates its form from them, so it cannot drift."""
    return {"config": RunConfig.model_json_schema(),
            "methods": {name: get_method(name).config.model_json_schema() for name in method_names()},
            "method_default": RunConfig.model_fields["method"].default}


def _errors(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        key = error_key(RunConfig, e)
        out.append((key, "unknown key" if e["type"] == "extra_forbidden" else error_message(e, key)))
    return out


def _key_of(message: str) -> str:
    """The config key a one-line LmtuneError names (`'train.lr': ...`, `set data.max_length=...`), or ""."""
    found = re.search(r"'((?:model|data|train|method|preference|grpo|task|output_dir)[\w.]*)'", message) or re.search(
        r"\b((?:model|data|train|method|preference|grpo)\.\w+)=", message)
    return found.group(1) if found else ""


def build(overrides: list[str]) -> RunConfig:
    """The form's `key=value` overrides (the CLI's language) -> a validated RunConfig, or FieldErrors."""
    raw: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for assignment in overrides:
        try:
            apply_override(raw, assignment)
        except LmtuneError as err:
            problems.append((assignment.partition("=")[0], str(err)))
    return _validate(raw, problems)


def _validate(raw: dict[str, Any], problems: list[tuple[str, str]]) -> RunConfig:
    """Validate the whole config at once (the method section with it), so that every mistake is reported."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += _errors(err)
    if problems:
        raise FieldErrors(problems)
    return cfg


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def values(cfg: RunConfig) -> dict[str, Any]:
    """The form's values of a config: dotted keys -> values (lists of data sources as written in YAML)."""
    data = cfg.model_dump(mode="json")
    for section in ("train", "eval"):
        sources = data["data"][section]
        if sources is not None:  # a plain path when its weight is the default, as one would write it
            data["data"][section] = [s["path"] if s["weight"] == 1.0 else s for s in sources]
    return _flat(data)


def to_yaml(cfg: RunConfig) -> str:
    """The config as a YAML file holding only what differs from the defaults (as the example YAMLs do)."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    for section in ("train", "eval"):  # a plain path when its weight is the default, as one would write it
        sources = getattr(cfg.data, section)
        if sources is not None:
            data["data"][section] = [s.path if s.weight == 1.0 else s.model_dump() for s in sources]
    if list(data.get("method", {})) == ["name"]:  # `method: lora` when it has no options of its own
        data["method"] = cfg.method.name
    return yaml.safe_dump(data, sort_keys=False)


def from_yaml(text: str) -> RunConfig:
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as err:
        raise FieldErrors([("", f"not valid YAML ({getattr(err, 'problem', err)})")]) from None
    if not isinstance(raw, dict):
        raise FieldErrors([("", "the top level must be a mapping of keys (model, method, data, train, ...)")])
    return _validate(raw, [])


class Superseded(LmtuneError):
    """A newer estimate request arrived; this one's answer would not be shown."""


class Estimator:
    """`lmtune estimate` for the form: the same plan and estimate functions, cached, one at a time.

    Each estimate is bounded: it stops (at its next traced op) when it runs past `seconds` or when a newer request
    arrives (the page shows only the newest), so a runaway estimate never keeps the lock from the next one."""

    def __init__(self, seconds: float = 30.0) -> None:
        self._lock, self._cache, self.seconds = threading.Lock(), {}, seconds
        self._newest: object | None = None

    def __call__(self, cfg: RunConfig) -> dict:
        import dataclasses
        import time

        from lmtune.memory.report import available_memory, plan_from_config

        plan = plan_from_config(cfg)
        key = repr(dataclasses.replace(plan, method=cfg.method.model_dump_json()))
        ticket = self._newest = object()
        deadline = time.monotonic() + self.seconds

        def check() -> None:
            if self._newest is not ticket:
                raise Superseded("superseded by a newer estimate")
            if time.monotonic() > deadline:
                raise FieldErrors([("train.batch_size", f"the estimate ran past {self.seconds:g} s and was stopped; "
                                    "lower train.batch_size or data.max_length")])

        if not self._lock.acquire(timeout=self.seconds):
            raise LmtuneError("another estimate is still running; try again")
        try:
            if key not in self._cache:
                self._cache[key] = self._estimate(plan, check)
            est = dict(self._cache[key])
        finally:
            self._lock.release()
        free = available_memory(plan.device)
        est["available"], est["device"] = free, plan.device
        if est["per_device"] > free:
            est["warning"] = (f"needs about {est['per_device'] / GIB:.2f} GiB but {plan.device} has "
                              f"{free / GIB:.2f} GiB available: the run would be refused (or set force)")
        return est

    @staticmethod
    def _estimate(plan, check) -> dict:
        from lmtune.memory import estimate
        from lmtune.memory.trace import checked

        try:
            with checked(check):
                return estimate(plan).as_dict()
        except (FieldErrors, Superseded):
            raise
        except LmtuneError as err:
            raise FieldErrors([(_key_of(str(err)) or "model.name", str(err))]) from None
