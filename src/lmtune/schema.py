"""The base of every config class and the one-line validation error: shared by `config.py` and the method and
task registries (which `config.py` imports, so this module imports none of them)."""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, ValidationInfo, field_validator

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


def tagged_variants(annotation: Any) -> dict[str, type[BaseModel]] | None:
    """A union of config classes told apart by a literal `name` (the method section) -> {name: class}; else None."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) not in (Union, types.UnionType):
        return None
    variants = {}
    for member in get_args(annotation):
        member = get_args(member)[0] if get_origin(member) is Annotated else member  # Annotated[cls, Tag(name)]
        field = member.model_fields.get("name") if isinstance(member, type) and issubclass(member, BaseModel) else None
        if field is None or get_origin(field.annotation) is not Literal:
            return None
        variants.update(dict.fromkeys(get_args(field.annotation), member))
    return variants


def _locate(root: Any, loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """pydantic's error location -> (the dotted key's parts, the config class its last part is a key of). A tagged
    union puts the tag in the location (`method.lora.r`); the key a user writes has no tag (`method.r`)."""
    parts: list[str] = []
    owner, container = root, None
    for item in loc:
        variants = tagged_variants(owner)
        if variants is not None and item in variants:
            owner = variants[item]
            continue
        parts.append(str(item))
        container = owner if isinstance(owner, type) and issubclass(owner, BaseModel) else None
        field = container.model_fields.get(str(item)) if container is not None else None
        owner = field.annotation if field is not None else None
    return parts, container


def error_key(root: Any, e: dict, prefix: str = "") -> str:
    """The dotted config key one pydantic error is about; for an unknown tag, the tag's own key (`method.name`)."""
    parts, _ = _locate(root, e["loc"])
    if e["type"] == "union_tag_invalid":
        parts.append("name")  # the one tagged union, the method section, is told apart by `name`
    return ".".join([*([prefix] if prefix else []), *parts])


def _format_error(err: ValidationError, root: Any, prefix: str = "") -> str:
    """Turn pydantic's first error into one line that names the key."""
    e = err.errors()[0]
    loc = error_key(root, e, prefix)
    if e["type"] == "union_tag_invalid":  # the registry's own words (`get_method`), with no `config:` before them
        return error_message(e, loc)
    if e["type"] == "extra_forbidden":
        return f"config: unknown key '{loc}'{_suggest(*_locate(root, e['loc']))}"
    if e["type"] == "missing":
        return f"config: missing required key '{loc}'"
    return f"config: '{loc}': {error_message(e)} (got {e.get('input')!r})"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def error_message(e: dict, key: str = "") -> str:
    """pydantic's message for one error (`key`: its `error_key`), bounds written as `must be >= 0`."""
    if e["type"] == "union_tag_invalid":  # `method.name=nope`: "unknown method 'nope'; choose one of: ..."
        section = key.rsplit(".", 2)[-2] if "." in key else "value"
        choices = sorted(tag.strip().strip("'") for tag in e["ctx"]["expected_tags"].split(","))
        return f"unknown {section} '{e['ctx']['tag']}'; choose one of: {', '.join(choices)}"
    if e["type"] in _BOUNDS:
        (bound,) = e["ctx"].values()
        return f"must be {_BOUNDS[e['type']]} {f'{bound:g}' if isinstance(bound, float) else bound}"
    if e["type"] == "finite_number":
        return "must be a finite number"
    if e["type"] in ("too_short", "string_too_short"):
        return "must not be empty"
    return e["msg"].removeprefix("Value error, ")


def _suggest(parts: list[str], container: type[BaseModel] | None) -> str:
    """Name the closest known key of the section an unknown key was found in."""
    if container is None or not parts:
        return ""
    known = list(container.model_fields)
    close = difflib.get_close_matches(parts[-1], known, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"


def validate_as(cls: Any, raw: Any, prefix: str = "") -> Any:
    """Validate `raw` against a config class (or any type: the method union), raising LmtuneError with one line
    that names the key."""
    try:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls.model_validate(raw)
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as err:
        raise LmtuneError(_format_error(err, cls, prefix)) from None
