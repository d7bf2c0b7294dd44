"""The architecture holds: layers, pure core, one declaration per contract (DESIGN §6).

* The import contracts of ``.importlinter`` (import-linter): arrows point down
  only (cli → api → runtime → drivers → host → store → loading | render →
  core), drivers and host never persist, nothing below the API speaks HTTP,
  the core imports no I/O library.
* The core touches nothing on the host, standard library included (os,
  subprocess, asyncio…): an AST check of every core module.
* Every event kind is declared once (:mod:`reconciler.core.events`); the
  API's README and the dashboard's list of kinds agree with the declaration.
* The CLI is a thin shell: no module of it is over ~200 lines.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.core.events import EventKind
from reconciler.render.events import kinds_table

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "reconciler" / "core"
HOST_TOUCHING = {
    "os", "subprocess", "socket", "signal", "sqlite3", "psutil", "pynvml", "httpx", "watchfiles", "asyncio",
    "time", "threading", "shutil", "tempfile", "pathlib.Path.read_text",
    "reconciler.host", "reconciler.drivers", "reconciler.store", "reconciler.runtime", "reconciler.loading",
    "reconciler.api", "reconciler.cli",
}
CLI_MAX_LINES = 200


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


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_cli_module_is_a_thin_shell():
    long = {p.name: n for p in sorted((ROOT / "reconciler" / "cli").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > CLI_MAX_LINES}
    assert not long, f"cli modules over {CLI_MAX_LINES} lines (move the logic to runtime/, render/ or core/): {long}"


def test_the_api_readme_lists_every_event_kind_as_declared():
    readme = (ROOT / "reconciler" / "api" / "README.md").read_text()
    block = re.search(r"<!-- event-kinds:begin -->\n(.*?)<!-- event-kinds:end -->", readme, re.S)
    assert block is not None, "reconciler/api/README.md lost its event-kinds block"
    assert block.group(1) == kinds_table(), "regenerate the table: reconciler.render.events.kinds_table()"


def test_the_dashboard_listens_to_every_declared_kind():
    script = (ROOT / "reconciler" / "api" / "static" / "dashboard.js").read_text()
    listed = re.search(r"const KINDS = \[(.*?)\];", script, re.S)
    assert listed is not None
    names = set(re.findall(r'"([a-z_.]+)"', listed.group(1))) - {"message"}
    assert names == {kind.value for kind in EventKind}, "dashboard.js KINDS differs from EventKind"


def test_event_kinds_are_unique_and_described():
    values = [kind.value for kind in EventKind]
    assert len(values) == len(set(values))
    assert all(kind.doc for kind in EventKind)


def test_publishing_an_undeclared_kind_is_refused(tmp_path):
    from reconciler.runtime.events import EventBus
    from reconciler.testing.clock import FakeClock

    bus = EventBus(None, clock=FakeClock())
    with pytest.raises(TypeError, match="not declared"):
        bus.publish("lease.grantd")  # type: ignore[arg-type]
