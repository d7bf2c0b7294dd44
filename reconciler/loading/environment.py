"""``${VAR}`` references in a profile's ``managed`` strings, expanded at load time.

Profiles are shared between hosts, so paths that differ per host are written
as ``${CF_PYTHON:-python3}``: ``${NAME}`` is the variable's value and an error
when it is unset; ``${NAME:-default}`` falls back to ``default`` when the
variable is unset or empty; ``$${`` writes a literal ``${``. Only the strings
that say how to run a service are expanded (``exec_path``, ``args_template``,
``cwd``, ``env`` values, ``image``, ``volumes``, ``command_template``), and
only once, textually, *before* the templates are split and validated, so the
``{placeholder}`` check sees the expanded text. A value with spaces must be
quoted in a template, like any argument.

Afterwards a relative ``exec_path`` that contains a ``/`` (``./bin/server``,
``../demo/x``) is made absolute against the profile file's directory, so a
profile can ship with its scripts; a bare name (``python3``) is left for the
driver to find on ``PATH``.

Every value read from the environment is recorded with the profile
(:attr:`Profile.expansions <reconciler.core.profile.Profile.expansions>`), so
that no output ever shows it (:mod:`reconciler.core.redaction`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from reconciler.errors import Diagnostic
from reconciler.loading.positions import Path, Positions, dotted

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)
_STRING_FIELDS = ("exec_path", "args_template", "cwd", "image", "command_template")


def expand_string(
    text: str, environ: Mapping[str, str], expansions: dict[str, str] | None = None
) -> tuple[str, list[str]]:
    """``text`` with its references expanded, and a message for each bad or unset one.

    ``expansions`` collects value → reference for each variable expanded (what
    :class:`reconciler.core.redaction.Redactor` hides from every output).
    """
    problems: list[str] = []

    def one(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$${":
            return "${"
        if match.group(1) is None:
            problems.append("unterminated ${ reference; close it with }")
            return ""
        body = _BODY.fullmatch(match.group(1))
        if body is None:
            problems.append(f"bad reference {whole}; write ${{NAME}} or ${{NAME:-default}}")
            return ""
        name, default = body.group(1), body.group(2)
        value = environ.get(name)
        if value and expansions is not None:
            expansions[value] = f"${{{name}}}"
        if default is not None:
            return value if value else default
        if value is None:
            problems.append(
                f"environment variable {name} is not set; set it, or give a default: ${{{name}:-…}}"
            )
            return ""
        return value

    return _REFERENCE.sub(one, text), problems


def expand_profile(
    data: dict[str, Any],
    positions: Positions,
    filename: str,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    expansions: dict[str, str] | None = None,
) -> list[Diagnostic]:
    """Expand the ``managed`` strings of every service in place; return the problems found.

    ``expansions`` collects value → ``${NAME}`` for every variable read (a
    default used instead is no secret and is not collected).
    """
    env = os.environ if environ is None else environ
    diagnostics: list[Diagnostic] = []

    def expand(container: dict[str, Any] | list[Any], key: Any, path: Path) -> None:
        # key: a str into a dict, an int into a list (Any: mypy cannot pair them up)
        value = container[key]
        if not isinstance(value, str):
            return
        container[key], problems = expand_string(value, env, expansions)
        mark = positions.value(path)
        diagnostics.extend(Diagnostic(filename, mark.line, mark.col, f"{dotted(path)}: {p}") for p in problems)

    services = data.get("services")
    if not isinstance(services, dict):
        return diagnostics
    for name, service in services.items():
        managed = service.get("managed") if isinstance(service, dict) else None
        if not isinstance(managed, dict):
            continue
        base: Path = ("services", name, "managed")
        for field in _STRING_FIELDS:
            if field in managed:
                expand(managed, field, (*base, field))
        for field in ("env", "volumes"):
            items = managed.get(field)
            if isinstance(items, dict):
                keys: list[str | int] = list(items.keys())
            elif isinstance(items, list):
                keys = list(range(len(items)))
            else:
                continue
            for key in keys:
                expand(items, key, (*base, field, key))
        exec_path = managed.get("exec_path")
        if base_dir is not None and isinstance(exec_path, str) and "/" in exec_path and not os.path.isabs(exec_path):
            managed["exec_path"] = os.path.normpath(os.path.join(os.path.abspath(base_dir), exec_path))
    return diagnostics
