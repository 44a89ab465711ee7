"""The base of every config class and the one-line validation error: shared by `config.py` and the method and
task registries (which `config.py` imports, so this module imports none of them)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lmtune.errors import LmtuneError


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, docstrings become help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def _format_error(err: ValidationError, cls: type[BaseModel], prefix: str = "") -> str:
    """Turn pydantic's first error into one line that names the key."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *e["loc"]))
    if e["type"] == "extra_forbidden":
        return f"unknown key '{loc}'{_suggest(cls, e['loc'])}"
    if e["type"] == "missing":
        return f"missing required key '{loc}'"
    msg = e["msg"].removeprefix("Value error, ")
    return f"'{loc}': {msg} (got {e.get('input')!r})"


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
