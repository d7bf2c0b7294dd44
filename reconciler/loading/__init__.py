"""Reading profiles and snapshots with located errors (``file:line:col: message``).

Modules, one step each: :mod:`.source` (bytes → text, size and encoding
guards), :mod:`.yamltree` (YAML → plain data plus :mod:`.positions`),
:mod:`.environment` (``${VAR}`` expansion), :mod:`.validation` (pydantic
errors → diagnostics), then :mod:`.profiles`, :mod:`.snapshots` and
:mod:`.documents` put them together. Every failure is an
:class:`~reconciler.errors.InputError` carrying all diagnostics of the file.
"""

from reconciler.loading.documents import load_document
from reconciler.loading.profiles import load_profile, parse_profile
from reconciler.loading.snapshots import dump_snapshot, load_snapshot, parse_snapshot

__all__ = ["dump_snapshot", "load_document", "load_profile", "load_snapshot", "parse_profile", "parse_snapshot"]
