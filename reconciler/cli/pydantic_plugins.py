"""The command line loads no pydantic plugins unless asked: a start-up cost, not a feature we use.

pydantic looks for plugins (``pydantic`` entry points) the first time it
builds a model: :mod:`pydantic.plugin._loader` imports :mod:`importlib.metadata`
(and with it ``email``, ``zipfile``, ``csv``, ``tempfile``…) and reads the
metadata of every installed distribution. ``reconciler plan`` on a tiny
scenario spent 73 M of its 980 M instructions there (≈ 15 ms on the two-core
machine of issue 10), for no plugin at all; pydantic's own switch,
``PYDANTIC_DISABLE_PLUGINS``, skips the scan but not the import.

So, before a command builds its first model, :func:`skip_pydantic_plugins`
puts a module of our own in :data:`sys.modules` under the loader's name: its
``get_plugins()`` answers "none", which is what pydantic's answers with plugins
disabled. Anything else a later pydantic asks of that module is looked up in
the real one, which then replaces ours. The process is ours (only
:func:`reconciler.cli.main` calls this), so no library user's plugins are
turned off; nothing is changed in the environment our services inherit.

To have pydantic load its plugins after all, set ``PYDANTIC_DISABLE_PLUGINS``
in the environment: when it is set at all, pydantic reads it as it always does
(an empty value loads every plugin; ``__all__``, ``1`` or ``true`` none; a
comma-separated list all but those). ``tests/test_plan_cli.py`` checks both ways.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Mapping

LOADER = "pydantic.plugin._loader"
SWITCH = "PYDANTIC_DISABLE_PLUGINS"


def skip_pydantic_plugins(environ: Mapping[str, str] = os.environ) -> None:
    """Stand in for pydantic's plugin loader, unless ``PYDANTIC_DISABLE_PLUGINS`` is set or it is loaded."""
    if SWITCH in environ or LOADER in sys.modules:
        return
    stand_in = types.ModuleType(LOADER, "reconciler: no pydantic plugins (reconciler/cli/pydantic_plugins.py)")

    def get_plugins() -> tuple[()]:
        return ()

    def __getattr__(name: str) -> object:  # what we do not stand in for: the real loader, from now on
        if name.startswith("__"):  # the import system asking whether it is a package (``__path__``)
            raise AttributeError(name)
        if sys.modules.get(LOADER) is stand_in:
            del sys.modules[LOADER]
        return getattr(importlib.import_module(LOADER), name)

    stand_in.__dict__.update(get_plugins=get_plugins, __getattr__=__getattr__)
    sys.modules[LOADER] = stand_in
