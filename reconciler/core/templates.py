"""Launch templates: ``args_template`` → argv, one value per token, no shell.

The template is split first (POSIX shell-like quoting, via :func:`shlex.split`),
then placeholders are filled *inside* each token, so a value containing spaces
or quotes is always exactly one argv element and can never inject another.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

PLACEHOLDERS = ("port", "host_port", "gpu_id", "gpu_ids", "model", "service")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def find_placeholders(template: str) -> list[str]:
    """Names of the ``{placeholders}`` in ``template``, in order of appearance."""
    return _PLACEHOLDER.findall(template)


def fill(token: str, values: Mapping[str, object]) -> str:
    """Fill the placeholders of one token; a missing value becomes the empty string."""

    def one(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(one, token)


def split_template(template: str) -> list[str]:
    """Split like a POSIX shell would, without running one. Raises ValueError on bad quoting."""
    return shlex.split(template, posix=True)


def render_argv(template: str, values: Mapping[str, object]) -> list[str]:
    """Split ``template`` and fill each token: one value is always one token."""
    return [fill(token, values) for token in split_template(template)]
