"""The base of every config class and the one-line validation error: shared by `config.py` and the method and
task registries (which `config.py` imports, so this module imports none of them)."""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from lmtune.errors import LmtuneError


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, docstrings become help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)  # bounds are Field constraints; NaN / inf never pass

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        """`batch_size: true` is a slip, not 1 (pydantic's lax mode would take it)."""
        field = cls.model_fields.get(info.field_name or "")
        numeric = field is not None and {int, float} & {field.annotation, *get_args(field.annotation)}
        if isinstance(v, bool) and numeric:
            raise ValueError("must be a number, not true / false")
        return v


def _format_error(err: ValidationError, cls: type[BaseModel], prefix: str = "") -> str:
    """Turn pydantic's first error into one line that names the key."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *e["loc"]))
    if e["type"] == "extra_forbidden":
        return f"unknown key '{loc}'{_suggest(cls, e['loc'])}"
    if e["type"] == "missing":
        return f"missing required key '{loc}'"
    return f"'{loc}': {error_message(e)} (got {e.get('input')!r})"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def error_message(e: dict) -> str:
    """pydantic's message for one error, bounds written as `must be >= 0`."""
    if e["type"] in _BOUNDS:
        (bound,) = e["ctx"].values()
        return f"must be {_BOUNDS[e['type']]} {f'{bound:g}' if isinstance(bound, float) else bound}"
    if e["type"] == "finite_number":
        return "must be a finite number"
    if e["type"] in ("too_short", "string_too_short"):
        return "must not be empty"
    return e["msg"].removeprefix("Value error, ")


def _suggest(cls: type[BaseModel], loc: tuple) -> str:
    """Name the closest known key of the section an unknown key was found in."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        cls = field.annotation
    known = list(cls.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"


def validate_as(cls: type[BaseModel], raw: dict[str, Any], prefix: str = "") -> Any:
    """Validate a mapping against `cls`, raising LmtuneError with one line that names the key."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise LmtuneError(f"config: {_format_error(err, cls, prefix)}") from None
