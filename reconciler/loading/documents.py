"""Loading a file whose kind is given or guessed: profile or snapshot.

``validate`` accepts either kind. With ``kind="auto"`` a document with a
top-level ``format_version`` is a snapshot, anything else a profile. The file
is read once, up to the larger size limit, and held to its kind's limit once
the kind is known.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot
from reconciler.errors import Diagnostic, InputError
from reconciler.loading.profiles import profile_from_document
from reconciler.loading.snapshots import snapshot_from_document
from reconciler.loading.source import PROFILE_SIZE_LIMIT, SNAPSHOT_SIZE_LIMIT, decode, read_bytes
from reconciler.loading.yamltree import parse_yaml

Kind = Literal["profile", "snapshot", "auto"]
_LIMITS = {"profile": PROFILE_SIZE_LIMIT, "snapshot": SNAPSHOT_SIZE_LIMIT, "auto": SNAPSHOT_SIZE_LIMIT}


def load_document(
    path: str | os.PathLike[str], kind: Kind = "auto", environ: Mapping[str, str] | None = None
) -> Profile | Snapshot:
    """The profile or snapshot at ``path``; raises :class:`InputError` with every problem found."""
    filename = os.fspath(path)
    data = read_bytes(path, _LIMITS[kind])
    document = parse_yaml(decode(data, filename, _LIMITS[kind]), filename)
    if kind == "auto":
        kind = "snapshot" if isinstance(document.data, dict) and "format_version" in document.data else "profile"
    if kind == "snapshot":
        return snapshot_from_document(document, filename)
    if len(data) > PROFILE_SIZE_LIMIT:
        message = f"file too large ({len(data)} bytes, limit {PROFILE_SIZE_LIMIT} bytes)"
        raise InputError([Diagnostic(filename, 1, 1, message)])
    return profile_from_document(document, filename, environ, base_dir=os.path.dirname(filename) or ".")
