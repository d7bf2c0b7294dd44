"""``reconciler watch`` in process: what triggers a pass, what a rejected edit does, how it prints.

The runtime is replaced by a fake that records the profiles it is asked to
apply, so these tests are about the loop itself (:mod:`reconciler.runtime.loop`:
start, profile change, resync, wake, rejection, signals — a real SIGTERM to
this process) as the command puts it together; the end-to-end tests drive
the real thing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from reconciler.cli import watch_cmd
from reconciler.core.plan import Plan
from reconciler.core.profile import Profile
from reconciler.core.report import PassReport
from reconciler.core.snapshot import Snapshot
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.loading.watcher import ProfileFile, ProfileWatcher
from reconciler.render.events import format_text
from reconciler.runtime import EventBus
from reconciler.runtime import assembly as assembly_module
from reconciler.runtime import loop as loop_module

PROFILE = """\
schema_version: 1
name: {name}
services:
  a: {{max_mb: 0, priority: 1, probe_interval_s: 60}}
"""


class FakeStore:
    def __init__(self) -> None:
        self.meta: dict[str, str] = {}

    def instances(self) -> list:
        return []

    def holds(self) -> dict:
        return {}

    def set_meta(self, key: str, value: str | None) -> None:  # what `reconciler down` reads later
        if value is None:
            self.meta.pop(key, None)
        else:
            self.meta[key] = value


class FakeRuntime:
    """Stands in for :class:`reconciler.runtime.Runtime`: passes do nothing, instantly."""

    def __init__(self, *, store, gpu_backend, state_dir, clock, node, sim, events: EventBus) -> None:
        self.events = events
        self.clock = clock
        self.store = FakeStore()
        self.applied: list[str] = []
        self.recovered = False
        self._woken = asyncio.Event()
        FakeRuntime.last = self

    async def recover(self) -> None:
        self.recovered = True

    async def converge(self, profile, timeout_s: float) -> PassReport:
        self.applied.append(profile.name)
        plan = Plan(node="local", profile=profile.name, changes=False, actions=[], pending=[], gpus=[], summary={})
        snapshot = Snapshot(format_version=1, node="local", now=self.clock.now(), gpus=[])
        return PassReport(plan=plan, snapshot=snapshot, outcomes={})

    def wake(self) -> None:
        self._woken.set()

    async def wait_woken(self, timeout_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._woken.wait(), timeout_s)
        except TimeoutError:
            return False
        self._woken.clear()
        return True

    async def aclose(self) -> None:
        self.events.close()


def _stop(sig: signal.Signals = signal.SIGTERM) -> None:
    """What an operator's kill does: the signal, to this process (the loop owns the handlers)."""
    os.kill(os.getpid(), sig)


def _args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = {"profile": str(tmp_path / "p.yaml"), "profiles": None, "gpu": "none",
              "state_dir": str(tmp_path / "state"), "node": "local", "resync": 3600.0, "events": "json",
              "allow_empty": False}
    values.update(overrides)
    return argparse.Namespace(**values)


async def _until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _events(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_passes_on_start_change_and_wake_rejections_keep_the_last_good(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(assembly_module, "Runtime", FakeRuntime)
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE.format(name="one"))
    args = _args(tmp_path)
    seen: list[dict] = []

    def kinds(kind: str) -> list[dict]:
        return [e for e in seen if e["kind"] == kind]

    async def main() -> int:
        task = asyncio.ensure_future(watch_cmd.watch(args))
        await _until(lambda: getattr(FakeRuntime, "last", None) is not None)
        runtime = FakeRuntime.last
        subscription = runtime.events.subscribe()
        collecting = asyncio.ensure_future(_collect(subscription, seen))
        await _until(lambda: runtime.applied == ["one"])
        assert runtime.recovered
        path.write_text(PROFILE.format(name="two"))
        await _until(lambda: runtime.applied == ["one", "two"])
        path.write_text("schema_version: 1\nname: three\nservices: {a: {max_mb: 0}}\n")  # no priority
        await _until(lambda: len(kinds("profile.rejected")) == 1)
        path.write_text("schema_version: 1\nname: empty\nservices: {}\n")
        await _until(lambda: len(kinds("profile.rejected")) == 2)
        runtime.wake()
        await _until(lambda: len(runtime.applied) == 3)
        assert runtime.applied == ["one", "two", "two"]  # the last good profile is still the one applied
        path.write_text(PROFILE.format(name="five"))
        await _until(lambda: runtime.applied[-1] == "five")
        _stop(signal.SIGTERM)
        code = await asyncio.wait_for(task, 5)
        await asyncio.wait_for(collecting, 5)
        return code

    FakeRuntime.last = None
    assert asyncio.run(main()) == 0
    events = _events(capsys)
    assert events[0]["kind"] == "watch.started" and events[-1]["kind"] == "watch.stopped"
    reasons = [e["reason"] for e in events if e["kind"] == "pass.started"]
    assert reasons == ["start", "profile", "wake", "profile"]
    invalid, empty = [e for e in events if e["kind"] == "profile.rejected"]
    assert invalid["keeping"] == empty["keeping"] == "profile two"
    assert [(d["file"], d["line"]) for d in invalid["diagnostics"]] == [(str(path), 3)]
    assert "priority" in invalid["diagnostics"][0]["message"]
    assert "--allow-empty" in empty["message"] and empty["diagnostics"] == []
    assert events[-1]["signal"] == "SIGTERM"


async def _collect(subscription, into: list[dict]) -> None:
    async for event in subscription:
        into.append(event)


def test_resync_ticks_pass_again(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(assembly_module, "Runtime", FakeRuntime)
    (tmp_path / "p.yaml").write_text(PROFILE.format(name="one"))
    args = _args(tmp_path, resync=0.05)

    async def main() -> int:
        task = asyncio.ensure_future(watch_cmd.watch(args))
        await _until(lambda: getattr(FakeRuntime, "last", None) and len(FakeRuntime.last.applied) >= 3)
        _stop(signal.SIGINT)
        return await asyncio.wait_for(task, 5)

    FakeRuntime.last = None
    assert asyncio.run(main()) == 0
    reasons = [e["reason"] for e in _events(capsys) if e["kind"] == "pass.started"]
    assert reasons[0] == "start" and set(reasons[1:]) == {"resync"}


def test_a_failing_pass_is_reported_and_retried(tmp_path, monkeypatch, capsys) -> None:
    from reconciler.errors import StoreError

    class Flaky(FakeRuntime):
        failures = 2

        async def converge(self, profile, timeout_s: float) -> PassReport:
            if Flaky.failures:
                Flaky.failures -= 1
                raise StoreError("database is locked") if Flaky.failures else RuntimeError("a bug")
            return await super().converge(profile, timeout_s)

    monkeypatch.setattr(assembly_module, "Runtime", Flaky)
    monkeypatch.setattr(loop_module, "RETRY_AFTER_ERROR_S", 0.01)
    (tmp_path / "p.yaml").write_text(PROFILE.format(name="one"))
    args = _args(tmp_path)

    async def main() -> int:
        task = asyncio.ensure_future(watch_cmd.watch(args))
        await _until(lambda: getattr(FakeRuntime, "last", None) and FakeRuntime.last.applied == ["one"])
        _stop(signal.SIGTERM)
        return await asyncio.wait_for(task, 5)

    FakeRuntime.last = None
    assert asyncio.run(main()) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    failed = [e for e in events if e["kind"] == "pass.failed"]
    assert [(e["reason"], e["error"]) for e in failed] == [("start", "StoreError"), ("retry", "RuntimeError")]
    assert "database is locked" in failed[0]["message"]
    assert "Traceback" in captured.err and "a bug" in captured.err  # a bug shows its traceback; StoreError not
    assert [e["reason"] for e in events if e["kind"] == "pass.finished"] == ["retry"]


def test_a_second_watch_on_the_same_state_dir_is_refused(tmp_path, monkeypatch) -> None:
    from reconciler.errors import GuardError
    from reconciler.runtime.lock import StateLock

    (tmp_path / "p.yaml").write_text(PROFILE.format(name="one"))
    with StateLock(tmp_path / "state"), pytest.raises(GuardError, match="another reconciler"):
        asyncio.run(watch_cmd.watch(_args(tmp_path)))


def test_text_lines() -> None:
    ts = "2026-11-22T16:00:01.5Z"
    fmt = format_text
    assert fmt({"kind": "pass.started", "ts": ts}) is None
    assert fmt({"kind": "pass", "ts": ts}) is None
    assert fmt({"kind": "pass.finished", "ts": ts, "quiet": True}) is None
    assert fmt({"kind": "action.started", "ts": ts, "action": "start:a", "message": "wanted"}) == (
        "16:00:01   → start:a: wanted")
    assert fmt({"kind": "action.finished", "ts": ts, "action": "start:a", "status": "failed",
                "duration_s": 0.5, "message": "exited"}) == "16:00:01   ✗ start:a failed in 0.5 s: exited"
    line = fmt({"kind": "pass.finished", "ts": ts, "pass": 3, "reason": "profile", "duration_s": 0.2,
                "outcomes": {"done": 1}, "pending": [{"service": "b", "reason": "port 80 held by pid 7"}],
                "stalled": {"c": "stalled after 5 failures"}})
    assert line == ("16:00:01 pass 3 (profile) in 0.2 s: 1 done; pending b: port 80 held by pid 7; "
                    "stalled c: stalled after 5 failures")
    rejected = fmt({"kind": "profile.rejected", "ts": ts, "keeping": "profile demo", "message": "p.yaml is invalid",
                    "diagnostics": [{"file": "p.yaml", "line": 3, "col": 5, "message": "unknown key"}]})
    assert rejected.splitlines() == ["16:00:01 profile rejected, profile demo stays: p.yaml is invalid",
                                     "    p.yaml:3:5: unknown key"]
    assert fmt({"kind": "backoff", "ts": ts, "service": "a", "failures": 2}) == "16:00:01     backoff: failures=2"


def test_a_wake_that_arrives_with_a_rejected_edit_is_not_lost(tmp_path) -> None:
    """A wake (a lease request waiting) taken in the same round as a rejected profile change still
    makes a pass now, not at the next liveness tick."""
    from reconciler.errors import Diagnostic
    from reconciler.loading.watcher import ProfileChange

    class Woken:
        """A runtime woken once: its first wait_woken answers at once (and clears the wake)."""

        clock = SYSTEM_CLOCK

        def __init__(self) -> None:
            self.pending = True

        async def wait_woken(self, timeout_s: float | None = None) -> bool:
            if self.pending:
                self.pending = False
                return True
            await asyncio.sleep(timeout_s or 0)
            return False

    async def main() -> str | None:
        current = Profile.model_validate({"schema_version": 1, "name": "p", "services": {}})
        watcher = ProfileWatcher(ProfileFile(tmp_path / "p.yaml"), clock=SYSTEM_CLOCK)
        bus = EventBus(None, clock=SYSTEM_CLOCK)
        loop = loop_module.Loop(Woken(), watcher, ProfileChange(current), bus=bus,  # type: ignore[arg-type]
                                started=loop_module.Started(path="p.yaml", gpu="none", state_dir=str(tmp_path)))
        triggers: asyncio.Queue = asyncio.Queue()
        triggers.put_nowait(ProfileChange(None, (Diagnostic("p.yaml", 1, 1, "bad"),)))
        return await loop._next(triggers, ("liveness", 0.5))

    assert asyncio.run(main()) == "wake"


TWO_SERVICES = """\
schema_version: 1
name: torn
services:
  a: {max_mb: 0, priority: 1, probe_interval_s: 60}
  b: {max_mb: 0, priority: 1, probe_interval_s: 60}
"""


def test_a_save_written_in_two_chunks_never_applies_its_first_half(tmp_path, monkeypatch, capsys) -> None:
    """An in-place save in two writes 150 ms apart: the first half is a valid profile without `b`.
    It is held (it removes a service) and the second half replaces it before it applies, so no pass
    ever sees `b` gone; an edit that really removes `b` applies once the file has settled."""

    class Recording(FakeRuntime):
        async def converge(self, profile, timeout_s: float) -> PassReport:
            seen.append(sorted(profile.services))
            return await super().converge(profile, timeout_s)

    seen: list[list[str]] = []
    monkeypatch.setattr(assembly_module, "Runtime", Recording)
    monkeypatch.setattr(loop_module, "REMOVAL_SETTLE_S", 0.6)
    path = tmp_path / "p.yaml"
    path.write_text(TWO_SERVICES)
    args = _args(tmp_path)
    cut = TWO_SERVICES.index("  b:")

    async def main() -> int:
        task = asyncio.ensure_future(watch_cmd.watch(args))
        await _until(lambda: seen == [["a", "b"]])
        for _ in range(3):  # three torn saves, each in two chunks
            with open(path, "r+") as f:
                f.truncate(0)
                f.write(TWO_SERVICES[:cut] + "  c: {max_mb: 0, priority: 2}\n")
                f.flush()
                os.fsync(f.fileno())
                await asyncio.sleep(0.15)
                f.seek(0)
                f.truncate(0)
                f.write(TWO_SERVICES + "  c: {max_mb: 0, priority: 2}\n")
            await _until(lambda: seen[-1] == ["a", "b", "c"])
            path.write_text(TWO_SERVICES)
            await _until(lambda: seen[-1] == ["a", "b"])
        path.write_text(TWO_SERVICES[:cut])  # a real removal: applied once the file settled
        await _until(lambda: seen[-1] == ["a"], timeout_s=10)
        _stop(signal.SIGTERM)
        return await asyncio.wait_for(task, 5)

    FakeRuntime.last = None
    assert asyncio.run(main()) == 0
    assert ["a", "c"] not in seen and seen[-1] == ["a"]
    events = _events(capsys)
    held = [e for e in events if e["kind"] == "profile.held"]
    assert {tuple(e["removes"]) for e in held} == {("b",), ("c",)}  # the torn halves, and the real removals
    assert held[-1]["removes"] == ["b"] and held[-1]["message"].endswith("has not changed for 0.6 s")
