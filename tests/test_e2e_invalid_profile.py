"""End to end: invalid and empty profiles change nothing (invariants 2 and 3).

At start-up an invalid profile exits 1 with ``file:line:col`` errors before
anything is touched; a profile without services is refused unless
``--allow-empty``. While watching, an invalid save — in place, by atomic
rename, vim-style — is rejected with located diagnostics and the last good
profile stays in force; so is an edit that empties ``services``. Fixing the
file applies the fix.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.e2e_support import Host, alive, host, profile_text, service_block  # noqa: F401


def _in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _atomic_rename(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _vim(path: Path, text: str) -> None:
    backup = path.with_name(path.name + "~")
    os.replace(path, backup)
    path.write_text(text)
    backup.unlink()


def _line_of(text: str, needle: str) -> tuple[int, int]:
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number, line.index(needle) + 1
    raise AssertionError(needle)


def test_invalid_saves_change_nothing_until_fixed(host: Host) -> None:
    ports = {"alpha": host.port(), "beta": host.port()}

    def good(args: str = "") -> str:
        return profile_text(
            service_block("alpha", ports["alpha"], priority=1, args=args), service_block("beta", ports["beta"])
        )

    host.write(good())
    run = host.watch()
    run.wait_converged()
    pids = host.pids()
    base = good("--startup-delay 0.1")  # what the broken edits were heading for
    broken = [
        (_in_place, base.replace("    priority: 1\n", "    priorty: 1\n"), "priorty", "did you mean 'priority'"),
        (_atomic_rename, base.replace("max_mb: 1024", "max_mb: lots", 1), "lots", "max_mb"),
        (_vim, base.replace("    priority: 2\n", "    priority: [2\n"), None, ""),
    ]
    for save, text, needle, words in broken:
        mark = run.mark
        save(host.profile, text)
        rejected = run.wait_kind("profile.rejected")
        assert not [e for e in run.since(mark) if e["kind"].startswith(("action.", "instance."))]
        first = rejected["diagnostics"][0]
        assert first["file"] == str(host.profile), save.__name__
        if needle is not None:
            assert (first["line"], first["col"]) == _line_of(text, needle), (save.__name__, first)
            assert words in first["message"]
        else:  # a YAML syntax error: located somewhere after the unclosed bracket
            assert first["line"] >= _line_of(text, "[2")[0], first
        assert host.pids() == pids and all(alive(p) for p in pids.values())

    _vim(host.profile, base)  # fixed: the change it was meant to be applies
    run.wait_kind("profile.reloaded")
    fixed = run.wait_kind("pass.finished", reason="profile")
    assert fixed["actions"] == ["restart:alpha"] and fixed["outcomes"] == {"done": 1}
    assert host.pids()["beta"] == pids["beta"] and host.pids()["alpha"] != pids["alpha"]

    # emptying services is refused without --allow-empty; everything keeps running
    after = host.pids()
    _atomic_rename(host.profile, profile_text())
    refused = run.wait_kind("profile.rejected")
    assert "--allow-empty" in refused["message"] and refused["diagnostics"] == []
    run.wait_kind("pass.finished", reason="liveness")
    assert host.pids() == after and all(alive(p) for p in after.values())
    run.signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_invalid_profile_at_startup_exits_1_touching_nothing(host: Host) -> None:
    text = profile_text(service_block("alpha", host.port())).replace("always_on:", "alwayson:")
    host.write(text)
    run = host.watch()
    assert run.wait_exit() == 1
    line, col = _line_of(text, "alwayson")
    assert f"{host.profile}:{line}:{col}: " in run.stderr()
    assert [e["kind"] for e in run.events] == ["profile.rejected"]
    assert run.events[0]["diagnostics"][0]["line"] == line
    assert not (host.state_dir / "state.db").exists() and host.our_processes() == []


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
def test_empty_profile_needs_allow_empty(host: Host, allow: bool) -> None:
    host.write(profile_text())
    run = host.watch(*(["--allow-empty"] if allow else []))
    if not allow:
        assert run.wait_exit() == 1
        assert "--allow-empty" in run.stderr() and not (host.state_dir / "state.db").exists()
        return
    assert run.wait_kind("pass.finished", reason="start")["actions"] == []
    run.signal(signal.SIGINT)
    assert run.wait_exit() == 0
