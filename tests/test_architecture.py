"""The pure core imports nothing that touches the host (DESIGN §6)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "reconciler" / "core"
HOST_TOUCHING = {
    "os", "subprocess", "socket", "signal", "sqlite3", "psutil", "pynvml", "httpx", "watchfiles", "asyncio",
    "reconciler.host", "reconciler.drivers", "reconciler.store", "reconciler.runtime", "reconciler.loading",
    "reconciler.api", "reconciler.cli",
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_touches_nothing_on_the_host(path):
    offending = {
        name for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in HOST_TOUCHING)
    }
    assert not offending, f"{path.name} imports {sorted(offending)}"
