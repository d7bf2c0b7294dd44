"""The leasing service in-process (no HTTP, no pass loop): waits that must end, never spin."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from reconciler.api.refusals import status_of
from reconciler.core.snapshot import Demand, Lease
from reconciler.errors import LeaseRefused
from reconciler.runtime import leasing as leasing_module
from reconciler.runtime.leasing import LeaseRequest, Leasing
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
