"""Loading a profile: text → checked :class:`~reconciler.core.profile.Profile`.

The steps, each adding located diagnostics rather than stopping at the first:
decode the bytes (size, encoding), parse the YAML with positions, require a
mapping at the top, expand ``${VAR}`` references (and resolve a relative
``exec_path`` against the profile's directory), validate with pydantic in
strict mode (``port: "8000"`` is an error, as it is for the JSON Schema editors
use), then — only when the models accept the data — the checks that span
services (:func:`reconciler.core.checks.check_profile`). All problems of the
file are raised together, sorted by position, as one :class:`ProfileError`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any

from pydantic import ValidationError

from reconciler.core.checks import check_profile
from reconciler.core.profile import Profile
from reconciler.errors import Diagnostic, InputError, ProfileError
from reconciler.loading.environment import expand_profile
from reconciler.loading.positions import Path
from reconciler.loading.source import PROFILE_SIZE_LIMIT, decode, read_bytes
from reconciler.loading.validation import describe, validation_diagnostics
from reconciler.loading.yamltree import Document, parse_yaml


def load_profile(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Profile:
    """Read and check the profile at ``path``; raises :class:`ProfileError`."""
    filename = os.fspath(path)
    try:
        data = read_bytes(path, PROFILE_SIZE_LIMIT)
    except InputError as exc:
        raise ProfileError(exc.diagnostics) from None
    return parse_profile(data, filename, environ=environ, base_dir=FilePath(filename).parent)


def parse_profile(
    text: str | bytes,
    filename: str,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Profile:
    """Check a profile given as text; ``filename`` names it in diagnostics."""
    try:
        document = parse_yaml(decode(text, filename, PROFILE_SIZE_LIMIT), filename)
        return profile_from_document(document, filename, environ, base_dir)
    except InputError as exc:
        raise ProfileError(exc.diagnostics) from None


def profile_from_document(
    document: Document,
    filename: str,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Profile:
    require_mapping(document, filename, "a profile")
    diagnostics = expand_profile(document.data, document.positions, filename, environ, base_dir)
    try:
        profile = Profile.model_validate(document.data, strict=True)
    except ValidationError as exc:
        raise InputError(diagnostics + validation_diagnostics(exc, document, filename, Profile)) from None
    diagnostics += _cross_checks(profile, document, filename)
    if diagnostics:
        raise InputError(diagnostics)
    return profile


def require_mapping(document: Document, filename: str, what: str) -> None:
    if not isinstance(document.data, dict):
        raise InputError(
            [
                Diagnostic(
                    filename, 1, 1, f"the top level of {what} must be a mapping (key: value), got {describe(document.data)}"
                )
            ]
        )


def _cross_checks(profile: Profile, document: Document, filename: str) -> list[Diagnostic]:
    out = []
    for problem in check_profile(profile):
        path: Path = problem.path
        spot = document.positions.nearest(path)[1]
        mark = spot.value if isinstance(path[-1], int) or path[-1] in ("port", "host_port") else spot.key
        out.append(Diagnostic(filename, mark.line, mark.col, problem.message + _hint(path, problem.message, profile)))
    return out


def _hint(path: Path, message: str, profile: Profile) -> str:
    if message.startswith("dependency cycle"):
        return "; remove one of these depends_on entries"
    if len(path) == 4 and path[2] == "depends_on" and "not a service" in message:
        missing = _entry(profile, path)
        close = difflib.get_close_matches(str(missing), list(profile.services), n=1)
        return f"; did you mean {close[0]!r}?" if close else ""
    return ""


def _entry(profile: Profile, path: Path) -> Any:
    service = profile.services.get(str(path[1]))
    index = path[3]
    return service.depends_on[index] if service and isinstance(index, int) else None
