"""The leasing service in-process (no HTTP, no pass loop): waits that must end, never spin."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from reconciler.api.refusals import status_of
from reconciler.core.plan import Action
from reconciler.core.snapshot import Demand, Lease
from reconciler.errors import LeaseRefused
from reconciler.runtime import leasing as leasing_module
from reconciler.runtime.actions import Actuator
from reconciler.runtime.executor import Deferred
from reconciler.runtime.leasing import LeaseRequest, Leasing
from reconciler.testing.ports import free_port
from tests.runtime_support import env, fake_service, make_profile  # noqa: F401 (fixture)


def test_a_lease_granted_and_gone_before_the_answer_ends_the_wait_at_once(env):
    """A pass grants the demand, then the lease ends (a tiny ttl_s expires) before the waiting
    request looks: the demand is gone, so nothing can grant it again. The request answers at
    once instead of spinning on the set grant event until wait_s."""
    profile = make_profile({"svc": fake_service(None, max_mb=100)})

    async def main():
        async with env.runtime() as rt:
            leasing = Leasing(rt, lambda: profile)
            leasing.start()
            try:
                request = LeaseRequest(service="svc", holder="h", ttl_s=0.01, wait_s=60)
                task = asyncio.ensure_future(leasing.lease(request))
                for _ in range(100):
                    await asyncio.sleep(0.01)
                    if rt.store.demands("svc"):
                        break
                (demand,) = rt.store.demands("svc")
                lease = Lease(id=demand.id, service="svc", holder="h", gpu=0, expires_at=rt.clock.now())
                assert rt.ledger.grant(lease, 1, demand_id=demand.id, now=rt.clock.now())
                rt.grants.granted(lease)  # what the pass that granted it tells the waiting request
                rt.ledger.expire(rt.clock.now())  # the next pass's first step
                began = time.monotonic()
                with pytest.raises(LeaseRefused) as refused:
                    await asyncio.wait_for(task, 20)
                return time.monotonic() - began, refused.value
            finally:
                await leasing.close()

    waited, refused = asyncio.run(main())
    assert status_of(refused) == 503 and "ended" in refused.detail
    assert waited < 20


def test_an_expired_lease_wakes_the_loop_while_a_demand_waits(env, monkeypatch):
    """The expiry check reads the ledger (memory): a lease past its time wakes the loop, whose pass ends it."""
    monkeypatch.setattr(leasing_module, "EXPIRY_CHECK_S", 0.01)
    profile = make_profile({"svc": fake_service(None, max_mb=100)})

    async def main():
        async with env.runtime() as rt:
            woken = asyncio.Event()
            monkeypatch.setattr(rt, "wake", woken.set)
            leasing = Leasing(rt, lambda: profile)
            leasing.start()
            try:
                lease = Lease(id="l1", service="svc", holder="other", gpu=0,
                              expires_at=rt.clock.now() + timedelta(seconds=5))
                assert rt.ledger.grant(lease, 1, now=rt.clock.now())
                rt.ledger.add_demand(Demand(id="d1", service="svc", holder="h", requested_at=rt.clock.now()))
                await asyncio.sleep(0.1)
                early = woken.is_set()  # not yet expired: no wake
                env.clock.advance(6)
                await asyncio.wait_for(woken.wait(), 5)
                return early, [t.done() for t in leasing._tasks]
            finally:
                await leasing.close()

    early, done = asyncio.run(main())
    assert early is False and done == [False]


def test_a_stop_planned_before_a_warm_grant_leaves_the_instance_alone(env):
    """A warm grant takes no lock: a pass's stop, planned from a snapshot without that lease, is deferred."""
    profile = make_profile({"svc": fake_service(free_port(), always_on=True)})

    async def main():
        async with env.runtime() as rt:
            await rt.converge(profile, timeout_s=20)
            snapshot = await rt._observer_for(profile).observe(rt.store.instances(), rt.ledger.leases(), [])
            assert rt.ledger.grant(Lease(id="late", service="svc", holder="h"), 1, now=rt.clock.now())
            actuator = Actuator(rt.lifecycle, rt.ledger, profile, snapshot)
            with pytest.raises(Deferred, match="lease was granted on svc after the plan was made"):
                await actuator(Action(id="stop:svc", kind="stop", service="svc", reason="r"))
            return rt.ledger.fenced("svc"), rt.store.get_instance("svc")

    fenced, instance = asyncio.run(main())
    assert fenced is False and instance is not None and instance.state == "running"


def test_no_warm_grant_goes_to_an_instance_a_stop_is_ending(env, monkeypatch):
    profile = make_profile({"svc": fake_service(free_port(), always_on=True, max_concurrent=4)})

    async def main():
        async with env.runtime() as rt:
            await rt.converge(profile, timeout_s=20)
            leasing = Leasing(rt, lambda: profile)
            request = LeaseRequest(service="svc", holder="h")
            before = await leasing._fast(request, profile.services["svc"])
            stopping, finish = asyncio.Event(), asyncio.Event()

            async def slow_stop(*args, **kwargs):
                stopping.set()
                await finish.wait()
                return "stopped"

            monkeypatch.setattr(rt.lifecycle, "stop", slow_stop)
            snapshot = await rt._observer_for(profile).observe(rt.store.instances(), rt.ledger.leases(), [])
            actuator = Actuator(rt.lifecycle, rt.ledger, profile, snapshot)
            stop = asyncio.ensure_future(actuator(Action(id="stop:svc", kind="stop", service="svc", reason="r")))
            await stopping.wait()
            during = await leasing._fast(request, profile.services["svc"])
            finish.set()
            await stop
            return before, during, rt.ledger.fenced("svc")

    before, during, fenced_after = asyncio.run(main())
    assert before is not None and during is None and fenced_after is False
