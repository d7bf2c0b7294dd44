"""Converging, leases through their life, deadlines that leave a start for later; events and the guard."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from reconciler.core.events import EventKind
from reconciler.core.plan import Action
from reconciler.core.snapshot import Demand, Lease
from reconciler.errors import GuardError, StoreError
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.runtime import EventBus, check_profile_guard
from reconciler.runtime.actions import Actuator
from reconciler.store import open_store
from reconciler.testing.ports import free_port
from tests.runtime_support import T0, FakeClock, FakeMonotonic, env, fake_service, make_profile  # noqa: F401


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_converge_repeats_passes_until_nothing_is_left_to_do(env):
    a, b = free_port(), free_port()
    profile = make_profile({"a": fake_service(a, always_on=True), "b": fake_service(b, max_mb=1000)})

    async def main():
        async with env.runtime() as rt:
            rt.ledger.add_demand(Demand(id="D1", service="b", holder="kiwi", ttl_s=60, requested_at=T0))
            return rt, await rt.converge(profile, timeout_s=20)

    rt, report = asyncio.run(main())
    assert report.exit_code == 0 and report.plan.actions == [] and len(report.history) == 1
    first = report.history[0]
    assert [x.id for x in first.plan.actions] == ["start:a", "start:b", "lease:D1"]
    assert report.counts() == {"done": 3, "failed": 0, "skipped": 0, "deferred": 0}
    [lease] = rt.store.leases()
    assert (lease.id, lease.service, lease.holder, lease.gpu) == ("D1", "b", "kiwi", 0)
    assert lease.expires_at == T0 + __import__("datetime").timedelta(seconds=60)
    assert rt.store.demands() == []


def test_leases_expire_and_an_idle_service_is_stopped_after_idle_stop_after_s(env):
    port = free_port()
    profile = make_profile({"svc": fake_service(port, idle_stop_after_s=30)})

    async def main():
        async with env.runtime() as rt:
            rt.ledger.add_demand(Demand(id="D1", service="svc", ttl_s=60, requested_at=T0))
            granted = await rt.reconcile(profile)
            env.clock.advance(61)
            idle = await rt.reconcile(profile)
            env.clock.advance(30)
            stopped = await rt.reconcile(profile)
            return rt, granted, idle, stopped

    rt, granted, idle, stopped = asyncio.run(main())
    assert granted.outcomes["lease:D1"].status == "done"
    assert idle.plan.actions == [] and rt.store.leases() == []
    assert any(e.kind == "lease.expired" for e in rt.store.events(limit=1000))
    assert [a.id for a in stopped.plan.actions] == ["stop:svc"]
    assert "idle for 31 s" in stopped.plan.actions[0].reason
    assert stopped.outcomes["stop:svc"].status == "done" and rt.store.instances() == []


def test_a_lease_past_max_concurrent_is_refused(env):
    profile = make_profile({"svc": fake_service(free_port())})

    async def main():
        async with env.runtime() as rt:
            assert rt.ledger.grant(Lease(id="L1", service="svc"), 1, now=rt.clock.now())
            rt.ledger.add_demand(Demand(id="D2", service="svc"))
            snapshot = await rt._observer_for(profile).observe(demands=[Demand(id="D2", service="svc")])
            actuator = Actuator(rt.lifecycle, rt.ledger, profile, snapshot)
            with pytest.raises(StoreError, match="lease D2 refused: svc already holds 1 lease"):
                await actuator(Action(id="lease:D2", kind="lease", service="svc", lease="D2", reason="r"))
            return rt

    rt = asyncio.run(main())
    assert [lease.id for lease in rt.store.leases()] == ["L1"]


def test_a_deadline_leaves_a_slow_start_starting_for_a_later_pass(env):
    port = free_port()
    profile = make_profile({"slow": fake_service(port, always_on=True, startup_delay=1.0)})
    fake = FakeMonotonic()

    async def main():
        async with env.runtime(monotonic=fake, sleep=fake.sleep) as rt:
            report = await rt.converge(profile, timeout_s=0.5)
            state = rt.store.get_instance("slow").state
            deadline = time.monotonic() + 10
            while not answers(port):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            later = await rt.reconcile(profile, health_wait_s=0.5)
            return rt, report, state, later

    rt, report, state, later = asyncio.run(main())
    outcome = report.outcomes["start:slow"]
    assert outcome.status == "deferred" and "a later pass keeps waiting for its health" in outcome.detail
    assert report.exit_code == 2 and state == "starting"
    assert later.plan.actions == [] and rt.store.get_instance("slow").state == "running"
    assert env.launches("slow") == 1 and rt.store.open_intents() == []


def test_the_event_bus_records_and_delivers(tmp_path):
    clock = FakeClock()

    async def main():
        with open_store(tmp_path, SYSTEM_CLOCK) as store:
            bus = EventBus(store, clock=clock)
            subscription = bus.subscribe(maxsize=2)
            bus.publish(EventKind.INSTANCE_LAUNCHED, service="svc", message="launched", pid=42)
            bus.publish(EventKind.PASS, done=1)
            bus.publish(EventKind.PASS, done=2)  # the slow subscriber loses its oldest event
            bus.close()
            got = [event async for event in subscription]
            return got, subscription.dropped, store.events()

    got, dropped, stored = asyncio.run(main())
    assert dropped == 1
    assert got == [{"id": 2, "ts": "2026-11-22T16:00:00Z", "kind": "pass", "done": 1},
                   {"id": 3, "ts": "2026-11-22T16:00:00Z", "kind": "pass", "done": 2}]
    assert [(e.kind, e.service, e.message, e.data) for e in stored] == [
        ("instance.launched", "svc", "launched", {"pid": 42}), ("pass", None, "", {"done": 1}),
        ("pass", None, "", {"done": 2})]


def test_the_guard_refuses_a_profile_without_services_unless_allowed():
    with pytest.raises(GuardError, match="--allow-empty"):
        check_profile_guard(make_profile({}), allow_empty=False)
    check_profile_guard(make_profile({}), allow_empty=True)
    check_profile_guard(make_profile({"svc": fake_service(free_port())}), allow_empty=False)


def test_wake_ends_a_wait(tmp_path):
    async def main(rt_factory):
        rt = rt_factory()
        assert await rt.wait_woken(0.01) is False
        asyncio.get_running_loop().call_later(0.01, rt.wake)
        assert await rt.wait_woken(5) is True
        await rt.aclose()

    from reconciler.host.gpu import NoGpuBackend
    from reconciler.runtime import Runtime
    from reconciler.store.sqlite import SqliteStore

    def factory():
        return Runtime(store=SqliteStore(tmp_path / "state.db", SYSTEM_CLOCK), gpu_backend=NoGpuBackend(),
                       state_dir=tmp_path, clock=SYSTEM_CLOCK)

    asyncio.run(main(factory))


def test_a_pass_can_bound_its_wait_for_health(env):
    profile = make_profile({"slow": fake_service(free_port(), always_on=True, startup_delay=30)})
    fake = FakeMonotonic()

    async def main():
        async with env.runtime(monotonic=fake, sleep=fake.sleep) as rt:
            report = await rt.reconcile(profile, health_wait_s=0.3)
            return report, rt.store.get_instance("slow")

    report, instance = asyncio.run(main())
    assert report.outcomes["start:slow"].status == "deferred" and instance.state == "starting"
