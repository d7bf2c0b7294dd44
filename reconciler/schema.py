"""JSON Schemas of the profile and snapshot formats, generated from the models.

Editors use them (``# yaml-language-server: $schema=../schemas/profile.schema.json``)
for completion, hover text and red squiggles, so every field carries its
description and default — including defaults made by a factory (``[]``,
``{}``), which pydantic leaves out. The committed files under ``schemas/`` are
this module's output; a test fails when they drift from the models.

The schema cannot express the checks that span fields (``depends_on``
targets, cycles, placeholders in templates, duplicate host ports): the loader
reports those; the schema is what an editor can check while one types.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal, cast

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot

DIALECT = "https://json-schema.org/draft/2020-12/schema"
Kind = Literal["profile", "snapshot"]
KINDS: dict[str, tuple[type[BaseModel], str]] = {
    "profile": (Profile, "reconciler profile (schema_version 1)"),
    "snapshot": (Snapshot, "reconciler state snapshot (format_version 1)"),
}


class _WithFactoryDefaults(GenerateJsonSchema):
    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return cast(Callable[[], Any], factory)()  # takes no data, as checked just above
        return super().get_default_value(schema)


def json_schema(kind: Kind) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) for ``kind``."""
    model, title = KINDS[kind]
    generated = model.model_json_schema(schema_generator=_WithFactoryDefaults, mode="validation")
    generated.pop("title", None)
    _close_pattern_maps(generated)
    for version in ("schema_version", "format_version"):
        if version in generated["properties"]:
            # The models' version validators, said the way JSON Schema can.
            generated["properties"][version]["const"] = 1
    head = {
        "$schema": DIALECT,
        "$id": f"urn:reconciler:schema:{kind}:1",
        "title": title,
        "description": generated.pop("description", ""),
    }
    return head | generated


def _close_pattern_maps(node: Any) -> None:
    """``dict[ServiceName, X]``: pydantic's ``patternProperties`` lets other keys through
    unchecked; say instead that every key must match and every value be an X."""
    if isinstance(node, dict):
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in node:
            (pattern, value), = patterns.items()
            del node["patternProperties"]
            node["propertyNames"] = {**node.get("propertyNames", {}), "pattern": pattern}
            node["additionalProperties"] = value
        for child in node.values():
            _close_pattern_maps(child)
    elif isinstance(node, list):
        for child in node:
            _close_pattern_maps(child)


def render(kind: Kind) -> str:
    """The schema as committed under ``schemas/``: JSON, indent 2, trailing newline."""
    return json.dumps(json_schema(kind), indent=2, ensure_ascii=False) + "\n"
