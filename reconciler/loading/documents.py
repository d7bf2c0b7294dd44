"""Loading a file whose kind is given or guessed: profile or snapshot.

``validate`` accepts either kind. With ``kind="auto"`` a document with a
top-level ``format_version`` is a snapshot, anything else a profile. The file
is read once, up to the larger size limit; a quick look for a top-level
``format_version`` line picks the kind before parsing, so that a file too
large for a profile is refused without parsing it (YAML parsing runs at about
1 MB/s, so a 10 MB mistake would otherwise cost seconds). Documents the look
misses (flow style) are recognised after parsing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Literal

from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot
from reconciler.errors import Diagnostic, InputError
from reconciler.loading.profiles import profile_from_document
from reconciler.loading.snapshots import snapshot_from_document, snapshot_from_text
from reconciler.loading.source import PROFILE_SIZE_LIMIT, SNAPSHOT_SIZE_LIMIT, decode, read_bytes
from reconciler.loading.yamltree import parse_yaml

Kind = Literal["profile", "snapshot", "auto"]
# A top-level format_version key, in block YAML (column 0) or JSON (any indentation).
_LOOKS_LIKE_SNAPSHOT = re.compile(r"""^(?:format_version|\s*"format_version")\s*:""", re.M)
_LIMITS = {"profile": PROFILE_SIZE_LIMIT, "snapshot": SNAPSHOT_SIZE_LIMIT, "auto": SNAPSHOT_SIZE_LIMIT}


def load_document(
    path: str | os.PathLike[str], kind: Kind = "auto", environ: Mapping[str, str] | None = None
) -> Profile | Snapshot:
    """The profile or snapshot at ``path``; raises :class:`InputError` with every problem found."""
    filename = os.fspath(path)
    data = read_bytes(path, _LIMITS[kind])
    text = decode(data, filename, _LIMITS[kind])
    if kind == "auto" and _LOOKS_LIKE_SNAPSHOT.search(text):
        kind = "snapshot"
    if kind == "snapshot":
        return snapshot_from_text(text, filename)
    if len(data) > PROFILE_SIZE_LIMIT:
        message = f"file too large ({len(data)} bytes, limit {PROFILE_SIZE_LIMIT} bytes)"
        raise InputError([Diagnostic(filename, 1, 1, message)])
    document = parse_yaml(text, filename)
    if kind == "auto" and isinstance(document.data, dict) and "format_version" in document.data:
        return snapshot_from_document(document, filename)
    return profile_from_document(document, filename, environ, base_dir=os.path.dirname(filename) or ".")
