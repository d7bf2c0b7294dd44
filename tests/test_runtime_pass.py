"""Reconcile passes with real processes on loopback ports and a simulated GPU (fake wall clock)."""

from __future__ import annotations

import asyncio

import httpx
import psutil
import pytest

from reconciler.drivers.process import is_alive
from reconciler.testing.ports import free_port
from tests.runtime_support import FakeMonotonic, env, fake_service, make_profile  # noqa: F401 (fixture)


def events(runtime) -> list[tuple[str, str]]:
    """(kind, action id or service) of every recorded event, in order."""
    return [(e.kind, e.data.get("action") or e.service or "") for e in runtime.store.events(limit=10_000)]


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_independent_starts_overlap_and_a_dependent_waits_for_its_dependency(env):
    pa, pb, pc = free_port(), free_port(), free_port()
    profile = make_profile({
        "a": fake_service(pa, max_mb=1000, always_on=True, startup_delay=0.4),
        "b": fake_service(pb, max_mb=1000, always_on=True, startup_delay=0.4),
        "c": fake_service(pc, always_on=True, depends_on=["a"]),
    })

    async def main():
        async with env.runtime() as rt:
            report = await rt.reconcile(profile)
            again = await rt.reconcile(profile)
            return rt, report, again

    rt, report, again = asyncio.run(main())
    assert {k: o.status for k, o in report.outcomes.items()} == {
        "start:a": "done", "start:b": "done", "start:c": "done"
    }
    assert report.exit_code == 0 and again.plan.actions == [] and again.exit_code == 0
    seen = events(rt)
    started = {a: seen.index(("action.started", f"start:{a}")) for a in "abc"}
    finished = {a: seen.index(("action.finished", f"start:{a}")) for a in "abc"}
    assert max(started["a"], started["b"]) < min(finished["a"], finished["b"])  # a and b overlapped
    assert started["c"] > seen.index(("instance.healthy", "a"))  # c began only once a was healthy
    assert all(healthy(p) for p in (pa, pb, pc))
    instances = {i.service: i for i in rt.store.instances()}
    assert {i.state for i in instances.values()} == {"running"} and instances["a"].gpu == 0
    assert rt.gpu_backend.read()[0].used_mb == 2000  # a and b, 1000 MB each, as simulated


def test_a_crashing_start_is_stopped_recorded_in_backoff_and_skips_its_dependents(env):
    pa, pb = free_port(), free_port()
    profile = make_profile({
        "a": fake_service(pa, always_on=True, startup_delay=5, crash_after=0.3),
        "b": fake_service(pb, always_on=True, depends_on=["a"]),
    })

    async def main():
        async with env.runtime() as rt:
            return rt, await rt.reconcile(profile)

    rt, report = asyncio.run(main())
    a, b = report.outcomes["start:a"], report.outcomes["start:b"]
    assert a.status == "failed" and "exited after" in a.detail and "exit status 1" in a.detail
    assert a.duration_s < 3  # it did not wait for start_timeout_s
    assert b.status == "skipped" and b.detail.startswith("requires start:a, which failed")
    assert rt.store.instances() == [] and env.launches("b") == 0
    backoff = rt.store.get_backoff("a")
    assert backoff.failures == 1 and (backoff.next_attempt_at - env.clock.now()).total_seconds() == 10
    assert report.exit_code == 2
    assert rt.store.open_intents() == []


def test_a_start_that_never_gets_healthy_gives_up_at_start_timeout_and_stops_its_process(env):
    port = free_port()
    profile = make_profile({"a": fake_service(port, always_on=True, refuse_health=True, start_timeout_s=3)})
    fake = FakeMonotonic()

    async def main():
        async with env.runtime(monotonic=fake, sleep=fake.sleep) as rt:
            return rt, await rt.reconcile(profile)

    rt, report = asyncio.run(main())
    outcome = report.outcomes["start:a"]
    assert outcome.status == "failed" and "not healthy within start_timeout_s 3 s" in outcome.detail
    assert "(last probe: " in outcome.detail  # the fake clock runs out before the process even listens
    intent = rt.store.events(limit=1000)
    launched = next(e for e in intent if e.kind == "instance.launched")
    assert not is_alive(launched.data["pid"], launched.data["create_time"])  # we stopped what we started
    assert rt.store.instances() == [] and rt.store.get_backoff("a").failures == 1


def test_evicts_a_less_important_service_first_and_waits_for_its_memory(env):
    low_port, high_port = free_port(), free_port()
    first = make_profile({"low": fake_service(low_port, max_mb=5000, priority=4, always_on=True)})
    second = make_profile({
        "low": fake_service(low_port, max_mb=5000, priority=4),
        "high": fake_service(high_port, max_mb=5000, priority=1, always_on=True, startup_delay=0.2),
    })

    async def main():
        async with env.runtime() as rt:
            assert (await rt.reconcile(first)).exit_code == 0
            low = rt.store.get_instance("low")
            report = await rt.reconcile(second)
            return rt, low, report

    rt, low, report = asyncio.run(main())
    assert [a.id for a in report.plan.actions] == ["evict:low", "start:high"]
    assert report.plan.actions[1].requires == ["evict:low"]
    evict = report.outcomes["evict:low"]
    assert evict.status == "done" and "exited after SIGTERM" in evict.detail
    assert "5000 MB back on GPU 0" in evict.detail  # the wait saw the simulated memory return
    seen = events(rt)
    assert seen.index(("action.finished", "evict:low")) < seen.index(("action.started", "start:high"))
    assert report.outcomes["start:high"].status == "done"
    assert not psutil.pid_exists(low.pid) or not is_alive(low.pid, low.create_time)
    assert [i.service for i in rt.store.instances()] == ["high"]
    gpu = rt.gpu_backend.read()[0]
    assert gpu.used_mb == 5000 and len(gpu.processes) == 1


def test_a_service_without_a_port_runs_once_it_survives_the_grace(env):
    profile = make_profile({"worker": fake_service(None, always_on=True)})  # listens on no port we know

    async def main():
        async with env.runtime() as rt:
            return rt, await rt.reconcile(profile), await rt.reconcile(profile)

    rt, first, second = asyncio.run(main())
    assert first.outcomes["start:worker"].status == "done"
    assert "no port to probe" in first.outcomes["start:worker"].detail
    assert second.plan.actions == [] and rt.store.get_instance("worker").state == "running"


async def probes_per_pass(rt, profile, monotonic, passes: int) -> list[int]:
    """The probes each of ``passes`` passes made, a second (and a little) apart on the fake clock."""
    made = []
    for _ in range(passes):
        monotonic.t += 1.01
        before = rt.steady.probes
        await rt.reconcile(profile)
        made.append(rt.steady.probes - before)
    return made


def test_a_steady_pass_probes_each_service_at_its_own_interval(env):
    """runtime/steady.py: passes come every smallest probe_interval_s (1 s here); a service of 5 s is probed
    by a steady pass only once its 5 s have passed, the other one at every pass."""
    pa, pb = free_port(), free_port()
    fast, slow = fake_service(pa, always_on=True), fake_service(pb, always_on=True)
    fast["probe_interval_s"], slow["probe_interval_s"] = 1, 5
    profile = make_profile({"fast": fast, "slow": slow})
    monotonic = FakeMonotonic()

    async def main():
        async with env.runtime(monotonic=monotonic, sleep=monotonic.sleep) as rt:
            await rt.reconcile(profile)
            full = await rt.reconcile(profile)  # the basis: every service probed now
            assert full.plan.actions == [] and rt.steady.reused == 0
            made = await probes_per_pass(rt, profile, monotonic, 5)
            assert rt.steady.reused == 5
            return made

    assert asyncio.run(main()) == [1, 1, 1, 1, 2]


def test_a_steady_pass_leaves_the_port_of_a_service_that_does_not_run_to_full_passes(env):
    """runtime/steady.py: a steady pass probes the services that run; the port of one that does not (not
    always_on, nobody asked for it) is looked at by the full passes only, at least every FULL_EVERY_S."""
    from reconciler.runtime.steady import FULL_EVERY_S

    running, idle = fake_service(free_port(), always_on=True), fake_service(free_port())
    running["probe_interval_s"] = idle["probe_interval_s"] = 1
    profile = make_profile({"running": running, "idle": idle})
    monotonic = FakeMonotonic()

    async def main():
        async with env.runtime(monotonic=monotonic, sleep=monotonic.sleep) as rt:
            await rt.reconcile(profile)
            full = await rt.reconcile(profile)
            assert full.plan.actions == [] and "idle" in full.snapshot.probes  # a full pass probes every port
            made = await probes_per_pass(rt, profile, monotonic, 3)
            assert rt.steady.reused == 3
            monotonic.t += FULL_EVERY_S
            await rt.reconcile(profile)  # the basis is too old: a full pass, which probes the idle port again
            assert rt.steady.reused == 3
            return made

    assert asyncio.run(main()) == [1, 1, 1]


def test_any_launch_error_is_a_failure_that_backs_off(env):
    """A launch the host cannot execute (a NUL byte in an environment value, past the planner's own
    check) is a driver failure: counted for the backoff, its intent finished — not a ValueError that
    escapes and leaves an unfinished start record on every pass."""
    from reconciler.errors import DriverError

    profile = make_profile({"svc": fake_service(free_port(), always_on=True)})
    spec = profile.services["svc"]
    assert spec.managed is not None
    broken = spec.model_copy(update={"managed": spec.managed.model_copy(update={"env": {"X": "a\x00b"}})})

    async def main():
        async with env.runtime() as rt:
            with pytest.raises(DriverError, match="cannot run"):
                await rt.lifecycle.start("svc", broken, None, None, "start:svc")
            return rt

    rt = asyncio.run(main())
    assert rt.store.get_backoff("svc").failures == 1
    assert rt.store.open_intents() == [] and rt.store.instances() == []


def test_a_quiet_pass_reuses_the_answer_until_an_instance_dies_or_the_profile_changes(env):
    """runtime/steady.py: on a converged host a pass looks again (pids, probes, GPUs) and reuses the last
    full pass's empty plan; an edit (a new profile), or a killed instance, is a full pass at once."""
    pa, pb = free_port(), free_port()
    profile = make_profile({"a": fake_service(pa, max_mb=1000, always_on=True),
                            "b": fake_service(pb, max_mb=500, always_on=True)})

    async def main():
        async with env.runtime() as rt:
            first = await rt.reconcile(profile)
            assert {o.status for o in first.outcomes.values()} == {"done"}
            full = await rt.reconcile(profile)  # converged: a full pass that plans nothing is the basis
            assert full.plan.actions == [] and rt.steady.reused == 0
            quiet = [await rt.reconcile(profile) for _ in range(3)]
            assert rt.steady.reused == 3 and all(r.plan.actions == [] for r in quiet)
            assert quiet[-1].snapshot.now >= full.snapshot.now and rt.last_pass().snapshot is quiet[-1].snapshot
            edited = profile.model_copy(deep=True)  # a reload is a new profile object: a full pass
            await rt.reconcile(edited)
            assert rt.steady.reused == 3
            await rt.reconcile(edited)
            assert rt.steady.reused == 4
            victim = next(i for i in rt.store.instances() if i.service == "a")
            psutil.Process(victim.pid).kill()
            psutil.Process(victim.pid).wait(10)
            noticed = await rt.reconcile(edited)  # the pid is gone: a full pass notices, and plans its start
            assert rt.steady.reused == 4 and "start:a" in noticed.outcomes
            return rt

    rt = asyncio.run(main())
    assert ("instance.gone", "a") in events(rt)
