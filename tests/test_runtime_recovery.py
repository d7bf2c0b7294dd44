"""Invariant 5: a reconciler that crashed finds its own processes again — no duplicate, no orphan."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from reconciler.core.snapshot import Instance
from reconciler.drivers.process import is_alive
from reconciler.errors import StoreError
from reconciler.testing.ports import free_port
from tests.runtime_support import RuntimeEnv, env, fake_service, listeners, make_profile  # noqa: F401 (fixture)


class SimulatedCrash(BaseException):
    """Not an Exception: nothing in the runtime catches it, as nothing survives a real crash."""


def crash_before_recording(env, profile):
    """Run a pass that dies after launching and writing the intent, before the instance is stored."""

    async def main():
        async with env.runtime() as rt:
            def crash(instance):
                raise SimulatedCrash
            rt.store.put_instance = crash
            await rt.reconcile(profile)

    with pytest.raises(SimulatedCrash):
        asyncio.run(main())
    deadline = time.monotonic() + 10
    while not listeners(profile.services["svc"].probe_port):  # the process outlived the crash
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_start_interrupted_after_launch_is_found_again_and_not_started_twice(env):
    port = free_port()
    profile = make_profile({"svc": fake_service(port, always_on=True)})
    crash_before_recording(env, profile)
    [launched] = listeners(port)

    async def main():
        async with env.runtime() as rt:
            assert rt.store.instances() == [] and len(rt.store.open_intents()) == 1
            await rt.recover()
            recovered = rt.store.get_instance("svc")
            first = await rt.reconcile(profile)
            second = await rt.reconcile(profile)
            return rt, recovered, first, second

    rt, recovered, first, second = asyncio.run(main())
    assert recovered.pid == launched and recovered.state == "starting" and recovered.origin == "started"
    assert recovered.launch is not None and recovered.launch.port == port
    assert first.plan.actions == [] and second.plan.actions == []
    assert rt.store.get_instance("svc").state == "running"  # the pass saw it healthy
    assert listeners(port) == [launched] and env.launches("svc") == 1  # one process, never a second
    assert rt.store.open_intents() == []
    assert any(e.kind == "intent.recovered" for e in rt.store.events(limit=1000))


def test_an_interrupted_start_whose_process_died_is_dropped_and_started_again(env):
    port = free_port()
    profile = make_profile({"svc": fake_service(port, always_on=True)})
    crash_before_recording(env, profile)
    [launched] = listeners(port)
    create_time = psutil.Process(launched).create_time()
    os.killpg(launched, signal.SIGKILL)
    while is_alive(launched, create_time):  # a signal takes a moment to land
        time.sleep(0.01)

    async def main():
        async with env.runtime() as rt:
            await rt.recover()
            assert rt.store.instances() == [] and rt.store.open_intents() == []
            return await rt.reconcile(profile)

    report = asyncio.run(main())
    assert report.outcomes["start:svc"].status == "done"
    assert len(listeners(port)) == 1 and listeners(port) != [launched]


def test_an_interrupted_stop_is_checked_again(env):
    port = free_port()
    profile = make_profile({"svc": fake_service(port, always_on=True)})

    async def main():
        async with env.runtime() as rt:
            await rt.reconcile(profile)
            instance = rt.store.get_instance("svc")
            # what a crash in the middle of a stop leaves: an open intent, the instance marked stopping
            rt.store.begin_intent("stop:svc", "stop", "svc", {"pid": instance.pid, "create_time": instance.create_time})
            rt.store.put_instance(instance.model_copy(update={"state": "stopping"}))
            ghost = Instance(service="ghost", origin="started", pid=instance.pid, create_time=instance.create_time - 50,
                             state="stopping")
            rt.store.put_instance(ghost)
            rt.store.begin_intent("evict:ghost", "evict", "ghost", {"pid": ghost.pid, "create_time": ghost.create_time})
        async with env.runtime() as rt:
            await rt.recover()
            return rt, {i.service: i.state for i in rt.store.instances()}, rt.store.open_intents()

    _rt, states, still_open = asyncio.run(main())
    assert states == {"svc": "running"}  # alive: ours again; the ghost's process is gone: forgotten
    assert still_open == []
    assert len(listeners(port)) == 1


def test_a_start_interrupted_before_its_pid_was_written_is_found_by_its_marker(env):
    """Dead between the launch and recording the pid: the intent's marker finds the process — no orphan."""
    port = free_port()
    profile = make_profile({"svc": fake_service(port, always_on=True)})

    async def crash_after_launch():
        async with env.runtime() as rt:
            def crash(intent_id, data):
                raise SimulatedCrash
            rt.store.update_intent = crash
            await rt.reconcile(profile)

    with pytest.raises(SimulatedCrash):
        asyncio.run(crash_after_launch())
    deadline = time.monotonic() + 10
    while not listeners(port):  # the process outlived the crash
        assert time.monotonic() < deadline
        time.sleep(0.02)
    [launched] = listeners(port)
    launched_at = psutil.Process(launched).create_time()

    async def main():
        async with env.runtime() as rt:
            [intent] = rt.store.open_intents()
            assert intent.data.get("pid") is None and rt.store.instances() == []
            await rt.recover()
            recovered = rt.store.get_instance("svc")
            first = await rt.reconcile(profile)
            return rt, recovered, first

    try:
        rt, recovered, first = asyncio.run(main())
        assert recovered is not None and recovered.origin == "started"
        assert recovered.pid == launched and abs(recovered.create_time - launched_at) <= 1
        assert first.plan.actions == [] and env.launches("svc") == 1  # never a second one
        assert listeners(port) == [launched] and rt.store.open_intents() == []
    finally:
        if is_alive(launched, launched_at):
            os.killpg(launched, signal.SIGKILL)


# --- an inventory that lost our processes (state.db deleted, moved aside): their marker finds them ------------


def _forget_the_store(runtime_env) -> None:
    """What an operator who deletes (or moves aside) the store leaves: no file, the processes running."""
    for runtime in runtime_env.runtimes:
        runtime.store.close()
    for name in ("state.db", "state.db-journal", "state.db-wal", "state.db-shm"):
        (runtime_env.state_dir / name).unlink(missing_ok=True)


def _with_env(service: dict, **env_vars: str) -> dict:
    service["managed"]["env"] = dict(env_vars)
    return service


def test_an_empty_store_finds_our_processes_by_their_marker_and_may_stop_them(env):
    ports = {"gpu-svc": free_port(), "cpu-svc": free_port()}
    services = {"gpu-svc": _with_env(fake_service(ports["gpu-svc"], max_mb=512, always_on=True), MODEL_DIR="/models"),
                "cpu-svc": fake_service(ports["cpu-svc"], always_on=True)}
    profile = make_profile(services)

    async def first():
        async with env.runtime() as rt:
            await rt.reconcile(profile)
            return {i.service: i for i in rt.store.instances()}

    before = asyncio.run(first())
    assert {i.state for i in before.values()} == {"running"} and before["gpu-svc"].gpu == 0
    _forget_the_store(env)

    async def second():
        async with env.runtime() as rt:
            assert rt.store.instances() == []
            await rt.recover()
            found = {i.service: i for i in rt.store.instances()}
            again = await rt.reconcile(profile)
            running = {i.service: i.state for i in rt.store.instances()}
            without_cpu_svc = await rt.reconcile(make_profile({"gpu-svc": services["gpu-svc"]}))
            return found, again, running, without_cpu_svc, rt.store.events(limit=1000)

    found, again, running, removed, events = asyncio.run(second())
    for name, was in before.items():
        now = found[name]
        assert (now.origin, now.state) == ("started", "starting")
        assert (now.pid, now.gpu, now.model) == (was.pid, was.gpu, was.model)
        assert abs(now.create_time - was.create_time) <= 1
        assert now.launch == was.launch, name  # argv, cwd, the profile's env keys, port: rebuilt from the process
    assert found["gpu-svc"].launch.env == {"MODEL_DIR": "/models"}  # only the profile's keys, not the rest
    assert again.plan.actions == [] and running == {"gpu-svc": "running", "cpu-svc": "running"}
    assert env.launches("gpu-svc") == 1 and env.launches("cpu-svc") == 1  # never a second copy
    assert sorted(e.service for e in events if e.kind == "instance.recovered") == ["cpu-svc", "gpu-svc"]
    assert [a.id for a in removed.plan.actions] == ["stop:cpu-svc"]  # ours: stopped when no longer wanted
    assert removed.outcomes["stop:cpu-svc"].status == "done"
    assert not is_alive(before["cpu-svc"].pid, before["cpu-svc"].create_time)
    assert listeners(ports["gpu-svc"]) == [before["gpu-svc"].pid]


def test_a_found_process_whose_launch_differs_from_the_profile_is_restarted(env):
    port = free_port()
    service = _with_env(fake_service(port, always_on=True), MODEL_DIR="/models")

    async def first():
        async with env.runtime() as rt:
            await rt.reconcile(make_profile({"svc": service}))
            return rt.store.get_instance("svc")

    was = asyncio.run(first())
    _forget_the_store(env)
    changed = make_profile({"svc": _with_env(fake_service(port, always_on=True), MODEL_DIR="/other-models")})

    async def second():
        async with env.runtime() as rt:
            await rt.recover()
            report = await rt.reconcile(changed)
            return report, rt.store.get_instance("svc")

    report, now = asyncio.run(second())
    assert [a.id for a in report.plan.actions] == ["restart:svc"] and report.outcomes["restart:svc"].ok
    assert "MODEL_DIR" in report.plan.actions[0].reason or "launch" in report.plan.actions[0].reason
    assert not is_alive(was.pid, was.create_time) and now.pid != was.pid
    assert now.launch.env == {"MODEL_DIR": "/other-models"} and listeners(port) == [now.pid]


def test_a_process_whose_marker_names_another_state_directory_is_never_taken(env, tmp_path):
    port = free_port()
    profile = make_profile({"svc": fake_service(port, always_on=True)})

    async def start_elsewhere():
        async with env.runtime() as rt:
            await rt.reconcile(profile)
            return rt.store.get_instance("svc")

    theirs = asyncio.run(start_elsewhere())
    other = RuntimeEnv(tmp_path / "other-state", env.tag, clock=env.clock)

    async def here():
        async with other.runtime() as rt:
            await rt.recover()
            recovered = rt.store.instances()
            report = await rt.reconcile(profile)
            return recovered, report, rt.store.events(limit=1000)

    try:
        recovered, report, events = asyncio.run(here())
    finally:
        for runtime in other.runtimes:
            runtime.store.close()
    assert recovered == [] and not [e for e in events if e.kind.startswith("instance.")]
    assert report.plan.actions == [] and [p.service for p in report.plan.pending] == ["svc"]  # its port is taken
    assert f"pid {theirs.pid}" in report.plan.pending[0].reason
    assert is_alive(theirs.pid, theirs.create_time) and listeners(port) == [theirs.pid]  # never signalled


def test_a_launched_process_that_cannot_be_recorded_is_stopped_again(env):
    """The store fails between the launch and recording it: nothing of ours may run unaccounted for."""
    port = free_port()
    profile = make_profile({"svc": fake_service(port, always_on=True)})
    launched: list[tuple[int, float]] = []

    async def main():
        async with env.runtime() as rt:
            def failing(intent_id, data):
                launched.append((data["pid"], data["create_time"]))
                raise StoreError(f"state store {rt.store.path}: write failed: disk I/O error")
            rt.store.update_intent = failing
            return await rt.reconcile(profile)

    report = asyncio.run(main())
    outcome = report.outcomes["start:svc"]
    assert outcome.status == "failed" and "cannot be recorded: it was stopped again" in outcome.detail, outcome
    [(pid, create_time)] = launched
    assert not is_alive(pid, create_time) and listeners(port) == []
