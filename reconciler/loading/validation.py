"""Pydantic's validation errors → located, operator-worded diagnostics.

A pydantic error's ``loc`` is almost a document path, except that it also
names union members (``process`` for a discriminated ``managed``, ``str`` /
``int`` for a plain union) and ``[key]`` for a bad mapping key. We walk the
``loc`` against the data to recover the real path, merge the per-member errors
of one union value into one message, and word each error type the way an
operator reads it ("expected an integer, got a string ('8000')"). An unknown
key gets a "did you mean" from the field names of the model at that level.
Errors about a key or a container point at the key; errors about a scalar
point at the value; a missing key points at the mapping that lacks it.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from reconciler.errors import Diagnostic
from reconciler.loading.positions import Mark, Path, Positions, dotted
from reconciler.loading.yamltree import Document

_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (true or false)",
    "list_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "datetime_type": "a date-time like 2026-11-22T16:00:00Z",
    "datetime_parsing": "a date-time like 2026-11-22T16:00:00Z",
    "datetime_from_date_parsing": "a date-time like 2026-11-22T16:00:00Z",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "≥"), "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "≤"), "less_than": ("lt", "<"),
}


def describe(value: Any) -> str:
    """What an operator wrote, in words: ``a string ('abc')``, ``a list``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def validation_diagnostics(
    exc: ValidationError, document: Document, filename: str, model: type[BaseModel]
) -> list[Diagnostic]:
    positions = document.positions
    entries: list[tuple[Path, bool, bool, ErrorDetails]] = []
    for error in exc.errors(include_url=False):
        path, is_key, via_union = _real_path(error["loc"], document.data, error["type"] == "missing")
        entries.append((path, is_key, via_union, error))

    suggested: set[Path] = set()
    missing: list[tuple[Path, Diagnostic]] = []
    out: list[Diagnostic] = []
    union_types: dict[Path, list[str]] = {}
    for path, is_key, via_union, error in entries:
        kind = error["type"]
        if via_union and kind in _TYPE_NAMES:
            union_types.setdefault(path, []).append(_TYPE_NAMES[kind])
        elif kind == "extra_forbidden":
            message, suggestion = _unknown_key(path, document.data, model)
            if suggestion:
                suggested.add((*path[:-1], suggestion))
            out.append(_at(filename, positions.key(path), message))
        elif kind == "missing":
            message = f"{_where(path[:-1])}missing required key {path[-1]!r}"
            missing.append((path, _at(filename, positions.key(path[:-1]), message)))
        elif kind == "union_tag_not_found":
            name = str((error.get("ctx") or {}).get("discriminator", "type")).strip("'")
            out.append(_at(filename, positions.key(path), f"{_where(path)}missing required key {name!r}"))
        elif is_key:
            message = f"{_where(path[:-1])}invalid name {path[-1]!r}: {_key_problem(error)}"
            out.append(_at(filename, positions.key(path), message))
        elif kind == "union_tag_invalid" and (*path, "type") in positions:
            out.append(_at(filename, positions.value((*path, "type")), _message((*path, "type"), error)))
        else:
            out.append(_at(filename, _value_mark(path, document.data, positions), _message(path, error)))
    for path, expected in union_types.items():
        wanted = _join(list(dict.fromkeys(expected)))
        message = f"{dotted(path)}: expected {wanted}, got {describe(_lookup(document.data, path))}"
        out.append(_at(filename, _value_mark(path, document.data, positions), message))
    # "unknown key 'max_mbb'; did you mean 'max_mb'?" already says what is missing.
    out.extend(d for path, d in missing if path not in suggested)
    return out


def _real_path(loc: tuple[str | int, ...], data: Any, missing: bool) -> tuple[Path, bool, bool]:
    """(document path, whether the error is about a mapping key, whether it is one member's error)."""
    path: list[str | int] = []
    current = data
    via_union = False
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if part == "[key]":
            return tuple(path), True, via_union
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            current = current[part]  # a branch of its own: here mypy knows ``part`` is an int
        elif last and missing:
            current = None
        else:
            # A union member's name (``process``, ``str``); at the end, the value failed every member.
            via_union = last
            continue
        path.append(part)
    return tuple(path), False, via_union


def _lookup(data: Any, path: Path) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _value_mark(path: Path, data: Any, positions: Positions) -> Mark:
    value = _lookup(data, path)
    return positions.key(path) if isinstance(value, (dict, list)) else positions.value(path)


def _at(filename: str, mark: Mark, message: str) -> Diagnostic:
    return Diagnostic(filename, mark.line, mark.col, message)


def _where(path: Path) -> str:
    return f"{dotted(path)}: " if path else ""


def _message(path: Path, error: ErrorDetails) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    where = _where(path)
    if kind == "string_type" and isinstance(value, (int, float)):
        shown = str(value).lower() if isinstance(value, bool) else value
        return f"{where}expected a string, got {describe(value)}; quote it: \"{shown}\""
    if kind in _TYPE_NAMES:
        return f"{where}expected {_TYPE_NAMES[kind]}, got {describe(value)}"
    if kind in _BOUNDS and path and str(path[-1]).endswith("port"):
        return f"{where}{value} is not a port number; use 1 to 65535"
    if kind in _BOUNDS:
        key, symbol = _BOUNDS[kind]
        return f"{where}must be {symbol} {ctx.get(key)}, got {value}"
    if kind == "union_tag_invalid":
        return f"{where}unknown type {ctx.get('tag')!r}; use one of {ctx.get('expected_tags')}"
    if kind == "literal_error":
        return f"{where}expected one of {ctx.get('expected')}, got {describe(value)}"
    if kind == "string_too_short":
        return f"{where}must not be empty"
    if kind == "string_too_long":
        return f"{where}is too long (at most {ctx.get('max_length')} characters)"
    if kind == "timezone_aware":
        return f"{where}needs a timezone, e.g. 2026-11-22T16:00:00Z"
    if kind == "value_error":
        return where + str(error["msg"]).removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        return f"{where}{_key_problem(error)}"
    return f"{where}{error['msg']}"


def _key_problem(error: ErrorDetails) -> str:
    if error["type"] == "string_pattern_mismatch":
        return "use letters, digits, '.', '_' and '-', starting with a letter or digit"
    if error["type"] == "string_too_long":
        return f"at most {(error.get('ctx') or {}).get('max_length')} characters"
    return str(error["msg"]).removeprefix("Value error, ")


def _unknown_key(path: Path, data: Any, model: type[BaseModel]) -> tuple[str, str | None]:
    key = str(path[-1])
    where = f"in {dotted(path[:-1])}" if len(path) > 1 else "at the top level"
    fields = _fields_at(model, path[:-1], data)
    if not fields:
        return f"unknown key {key!r} {where}", None
    import difflib  # for a message's "did you mean" only
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6) or [
        f for f in fields if f.lower() == key.lower().replace("-", "_")
    ]
    if close:
        return f"unknown key {key!r} {where}; did you mean {close[0]!r}?", close[0]
    return f"unknown key {key!r} {where}; allowed keys: {', '.join(fields)}", None


def _fields_at(model: type[BaseModel], path: Path, data: Any) -> list[str]:
    """Field names of the model that validates the mapping at ``path`` (empty if none)."""
    annotation: Any = model
    current = data
    for part in path:
        chosen = _choose_model(annotation, current)
        if chosen is not None:
            field = chosen.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        else:
            container = [a for a in _members(annotation) if typing.get_origin(a) in (dict, list)]
            if not container:
                return []
            # a list-or-mapping field (a service's models:): the member of the data's own shape
            container = [a for a in container if isinstance(current, typing.get_origin(a))] or container
            args = typing.get_args(container[0])
            annotation = args[-1] if args else Any
        current = _lookup(current, (part,))
    chosen = _choose_model(annotation, current)
    return list(chosen.model_fields) if chosen else []


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly Annotated, Optional or union) annotation."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _choose_model(annotation: Any, value: Any) -> type[BaseModel] | None:
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) > 1 and isinstance(value, dict):
        for candidate in models:
            tag = candidate.model_fields.get("type")
            if tag is not None and value.get("type") in typing.get_args(tag.annotation):
                return candidate
    return models[0] if models else None


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
