"""Reading profiles and snapshots with located errors (``file:line:col: message``).

Modules, one step each: :mod:`.source` (bytes → text, size and encoding
guards), :mod:`.yamltree` (YAML → plain data plus :mod:`.positions`),
:mod:`.environment` (``${VAR}`` expansion), :mod:`.validation` (pydantic
errors → diagnostics), then :mod:`.profiles`, :mod:`.snapshots` and
:mod:`.documents` put them together. Every failure is an
:class:`~reconciler.errors.InputError` carrying all diagnostics of the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reconciler.loading.documents import load_document
    from reconciler.loading.profiles import load_profile, parse_profile
    from reconciler.loading.snapshots import dump_snapshot, load_snapshot, parse_snapshot

_LAZY = {"load_document": "documents", "load_profile": "profiles", "parse_profile": "profiles",
         "dump_snapshot": "snapshots", "load_snapshot": "snapshots", "parse_snapshot": "snapshots"}


def __getattr__(name: str) -> Any:
    """The loaders, imported on first use (a command's parser does not pay for YAML and the models)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"reconciler.loading.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'reconciler.loading' has no attribute {name!r}")


__all__ = ["dump_snapshot", "load_document", "load_profile", "load_snapshot", "parse_profile", "parse_snapshot"]
