"""Loading a profile: text → checked :class:`~reconciler.core.profile.Profile`.

The steps, each adding located diagnostics rather than stopping at the first:
decode the bytes (size, encoding), parse the YAML with positions, require a
mapping at the top, expand ``${VAR}`` references (and resolve a relative
``exec_path`` against the profile's directory), validate with pydantic in
strict mode (``port: "8000"`` is an error, as it is for the JSON Schema editors
use), then the checks that span services
(:func:`reconciler.core.checks.check_profile`). All problems of the file are
raised together, sorted by position, as one :class:`ProfileError`.

An operator should not have to fix a typo in one service before learning that
another depends on a service that does not exist, so the errors come in one
round. When the models reject the data, the dependency checks
(:func:`reconciler.core.checks.check_dependencies`, missing targets and cycles)
still run on what the document plainly says: the names under a ``services``
mapping, and each service's ``depends_on`` where it is a list of valid service
names. A service whose ``depends_on`` cannot be read that way (not a list, an
entry that is not a name: its field error says so) counts as depending on
nothing, and without a ``services`` mapping there is nothing to check, so no
dependency error is guessed at. These diagnostics join the field errors; they
come from here or, for data the models accept, from ``check_profile``, never
from both, so none is reported twice. The host port check waits for models
that validate: a port means something only in a valid ``managed`` block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any

from pydantic import TypeAdapter, ValidationError

from reconciler.core.checks import Problem, check_dependencies, check_host, check_profile
from reconciler.core.profile import Profile, ServiceName
from reconciler.core.snapshot import Snapshot
from reconciler.errors import Diagnostic, InputError, ProfileError
from reconciler.loading.environment import expand_profile
from reconciler.loading.positions import Path
from reconciler.loading.source import PROFILE_SIZE_LIMIT, decode, read_bytes
from reconciler.loading.validation import describe, validation_diagnostics
from reconciler.loading.yamltree import Document, parse_yaml

_DEPENDS_ON: TypeAdapter[list[str]] = TypeAdapter(list[ServiceName])


def load_profile(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, host: Snapshot | None = None
) -> Profile:
    """Read and check the profile at ``path`` (against the host ``host`` shows, when given: see
    :func:`~reconciler.core.checks.check_host`); raises :class:`ProfileError`."""
    filename = os.fspath(path)
    try:
        data = read_bytes(path, PROFILE_SIZE_LIMIT)
    except InputError as exc:
        raise ProfileError(exc.diagnostics) from None
    return parse_profile(data, filename, environ=environ, base_dir=FilePath(filename).parent, host=host)


def parse_profile(
    text: str | bytes,
    filename: str,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    host: Snapshot | None = None,
) -> Profile:
    """Check a profile given as text; ``filename`` names it in diagnostics."""
    try:
        document = parse_yaml(decode(text, filename, PROFILE_SIZE_LIMIT), filename)
        return profile_from_document(document, filename, environ, base_dir, host)
    except InputError as exc:
        raise ProfileError(exc.diagnostics) from None


def profile_from_document(
    document: Document,
    filename: str,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    host: Snapshot | None = None,
) -> Profile:
    require_mapping(document, filename, "a profile")
    expansions: dict[str, str] = {}
    diagnostics = expand_profile(document.data, document.positions, filename, environ, base_dir, expansions)
    try:
        profile = Profile.model_validate(document.data, strict=True)
    except ValidationError as exc:
        diagnostics += validation_diagnostics(exc, document, filename, Profile)
        depends_on = _readable_dependencies(document.data)
        diagnostics += _cross_checks(check_dependencies(depends_on), depends_on, document, filename)
        raise InputError(diagnostics) from None
    depends_on = {name: service.depends_on for name, service in profile.services.items()}
    diagnostics += _cross_checks(check_profile(profile), depends_on, document, filename)
    if host is not None:
        diagnostics += _cross_checks(check_host(profile, host), depends_on, document, filename)
    if diagnostics:
        raise InputError(diagnostics)
    profile.remember_expansions(expansions)
    return profile


def require_mapping(document: Document, filename: str, what: str) -> None:
    if not isinstance(document.data, dict):
        raise InputError(
            [
                Diagnostic(
                    filename, 1, 1,
                    f"the top level of {what} must be a mapping (key: value), got {describe(document.data)}",
                )
            ]
        )


def _readable_dependencies(data: dict[str, Any]) -> dict[str, list[str]]:
    """Every service name → its ``depends_on``, from data the models rejected; empty where unreadable."""
    services = data.get("services")
    if not isinstance(services, dict):
        return {}
    out: dict[str, list[str]] = {}
    for name, service in services.items():
        deps = service.get("depends_on", []) if isinstance(service, dict) else []
        try:
            out[str(name)] = _DEPENDS_ON.validate_python(deps, strict=True)
        except ValidationError:
            out[str(name)] = []
    return out


def _cross_checks(
    problems: list[Problem], depends_on: dict[str, list[str]], document: Document, filename: str
) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for problem in problems:
        path: Path = problem.path
        spot = document.positions.nearest(path)[1]
        mark = spot.value if isinstance(path[-1], int) or path[-1] in ("port", "host_port") else spot.key
        message = problem.message + _hint(path, problem.message, depends_on)
        out.append(Diagnostic(filename, mark.line, mark.col, message))
    return out


def _hint(path: Path, message: str, depends_on: dict[str, list[str]]) -> str:
    if message.startswith("dependency cycle"):
        return "; remove one of these depends_on entries"
    if len(path) == 4 and path[2] == "depends_on" and "not a service" in message:
        missing = _entry(depends_on, path)
        import difflib  # for a message's "did you mean" only
        close = difflib.get_close_matches(str(missing), list(depends_on), n=1)
        return f"; did you mean {close[0]!r}?" if close else ""
    return ""


def _entry(depends_on: dict[str, list[str]], path: Path) -> str | None:
    deps = depends_on.get(str(path[1]), [])
    index = path[3]
    return deps[index] if isinstance(index, int) and 0 <= index < len(deps) else None
