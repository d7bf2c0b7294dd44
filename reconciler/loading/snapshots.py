"""Loading and writing state snapshots (DESIGN §2), JSON or YAML.

JSON is YAML, so one parser reads both and every error is located the same
way. The data is validated in pydantic's strict JSON mode: numbers must be
numbers and booleans booleans, yet times may be written as ISO 8601 text
(they must carry a timezone). :func:`dump_snapshot` writes stable JSON
(field order of the models, indent 2) that :func:`load_snapshot` reads back
to an equal snapshot.

A JSON snapshot (as ``reconciler observe`` writes) takes a fast path through
:mod:`json` and is re-read with the YAML parser only when it turns out
invalid (or has a duplicate key), to locate the problems; YAML parsing is
much slower on the large snapshots of a busy host.
"""

from __future__ import annotations

import json
import os

from pydantic import ValidationError

from reconciler.core.snapshot import Snapshot
from reconciler.errors import InputError, SnapshotError
from reconciler.loading.profiles import require_mapping
from reconciler.loading.source import SNAPSHOT_SIZE_LIMIT, decode, read_bytes
from reconciler.loading.validation import validation_diagnostics
from reconciler.loading.yamltree import Document, parse_yaml


def load_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read and check the snapshot at ``path``; raises :class:`SnapshotError`."""
    try:
        data = read_bytes(path, SNAPSHOT_SIZE_LIMIT)
    except InputError as exc:
        raise SnapshotError(exc.diagnostics) from None
    return parse_snapshot(data, os.fspath(path))


def parse_snapshot(text: str | bytes, filename: str) -> Snapshot:
    """Check a snapshot given as text; ``filename`` names it in diagnostics."""
    try:
        return snapshot_from_text(decode(text, filename, SNAPSHOT_SIZE_LIMIT), filename)
    except InputError as exc:
        raise SnapshotError(exc.diagnostics) from None


def snapshot_from_text(text: str, filename: str) -> Snapshot:
    if text.lstrip().startswith("{"):
        try:
            return Snapshot.model_validate_json(
                json.dumps(json.loads(text, object_pairs_hook=_unique_keys)), strict=True
            )
        except (ValueError, ValidationError):
            pass  # located below
    return snapshot_from_document(parse_yaml(text, filename), filename)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def snapshot_from_document(document: Document, filename: str) -> Snapshot:
    require_mapping(document, filename, "a snapshot")
    try:
        # allow_nan keeps a YAML .inf/.nan a (rejected or accepted) number rather than a crash.
        return Snapshot.model_validate_json(json.dumps(document.data, allow_nan=True), strict=True)
    except ValidationError as exc:
        raise InputError(validation_diagnostics(exc, document, filename, Snapshot)) from None


def dump_snapshot(snapshot: Snapshot) -> str:
    """Stable JSON text of ``snapshot`` (indent 2, trailing newline)."""
    return json.dumps(snapshot.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
