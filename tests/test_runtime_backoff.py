"""Invariant 6: a service that keeps failing backs off (10 s doubling, capped), stalls, never hot-loops."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from reconciler.core.backoff import DEFAULT_POLICY as BACKOFF_POLICY
from reconciler.core.backoff import after_failure
from reconciler.core.plan import Action, Plan
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.runtime.backoff import action_spec_hash, hold_back
from reconciler.store import open_store
from reconciler.testing.ports import free_port
from tests.runtime_support import T0, env, fake_service, make_profile  # noqa: F401 (fixture)


def test_the_policy_is_the_one_the_issue_asks_for():
    assert (BACKOFF_POLICY.base_s, BACKOFF_POLICY.factor, BACKOFF_POLICY.max_s) == (10, 2, 300)
    assert (BACKOFF_POLICY.reset_after_s, BACKOFF_POLICY.stall_after) == (600, 5)
    assert [BACKOFF_POLICY.delay(n).total_seconds() for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]


def test_an_always_crashing_service_backs_off_stalls_and_never_hot_loops(env):
    port = free_port()
    profile = make_profile({"crashy": fake_service(port, always_on=True, crash_after=0)})

    async def main():
        async with env.runtime() as rt:
            history = []
            for wait in (0, 5, 5, 1, 9, 19, 1, 39, 1, 79, 1):  # seconds of fake time before each pass
                env.clock.advance(wait)
                report = await rt.reconcile(profile)
                history.append((env.launches("crashy"), report.outcomes["start:crashy"].status,
                                report.stalled.get("crashy")))
            return rt, history

    rt, history = asyncio.run(main())
    launches = [h[0] for h in history]
    # passes at t=0, 5, 10, 11, 20, 39, 40, 79, 80, 159, 160; launches at 0, 10, 39, 79, 159: each
    # retry only once its backoff (10, 20, 40, 80 s after the last failure) has passed
    assert launches == [1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5]
    statuses = [h[1] for h in history]
    assert statuses == ["failed", "deferred", "failed", "deferred", "deferred", "failed", "deferred", "failed",
                        "deferred", "failed", "deferred"]
    backoff = rt.store.get_backoff("crashy")
    assert backoff.failures == 5 and backoff.stalled
    assert backoff.next_attempt_at == T0 + timedelta(seconds=159 + 160)
    reason = history[-1][2]
    assert reason.startswith("stalled after 5 failures; last: exited after ") and "next attempt in 159 s" in reason
    assert rt.store.instances() == []


def test_a_changed_spec_is_tried_at_once(env):
    port = free_port()
    crashing = make_profile({"svc": fake_service(port, always_on=True, crash_after=0)})
    fixed = make_profile({"svc": fake_service(port, always_on=True)})

    async def main():
        async with env.runtime() as rt:
            first = await rt.reconcile(crashing)
            env.clock.advance(1)
            held = await rt.reconcile(crashing)
            fixed_report = await rt.reconcile(fixed)
            return first, held, fixed_report

    first, held, fixed_report = asyncio.run(main())
    assert first.outcomes["start:svc"].status == "failed"
    assert held.outcomes["start:svc"].status == "deferred"
    assert fixed_report.outcomes["start:svc"].status == "done"  # another launch spec: a fresh count
    assert fixed_report.stalled == {}


def test_a_backed_off_start_holds_back_its_lease_and_the_eviction_made_for_it(tmp_path):
    profile = make_profile({
        "low": fake_service(free_port(), max_mb=5000, priority=4),
        "high": fake_service(free_port(), max_mb=5000, priority=1),
        "other": fake_service(free_port(), priority=3),
    })
    plan = Plan(node="local", profile="test", changes=True, gpus=[], summary={}, pending=[], actions=[
        Action(id="evict:low", kind="evict", service="low", gpu=0, mb=5000, reason="r"),
        Action(id="release:L0", kind="release", service="low", lease="L0", requires=["evict:low"], reason="r"),
        Action(id="start:high", kind="start", service="high", gpu=0, mb=5000, requires=["evict:low"], reason="r"),
        Action(id="lease:D1", kind="lease", service="high", lease="D1", requires=["start:high"], reason="r"),
        Action(id="start:other", kind="start", service="other", reason="r"),
    ])
    with open_store(tmp_path, SYSTEM_CLOCK) as store:
        digest = action_spec_hash(profile, plan.actions[2])
        store.update_backoff("high", lambda old: after_failure(old, "boom", digest, T0, BACKOFF_POLICY))
        deferred, stalled = hold_back(plan, profile, store, T0 + timedelta(seconds=5))
        assert set(deferred) == {"start:high", "lease:D1", "evict:low", "release:L0"}
        assert deferred["lease:D1"] == "requires start:high, which is deferred"
        assert deferred["evict:low"] == "only start:high needed it, which is deferred"
        assert deferred["start:high"].startswith("high is backing off after 1 failure; last: boom; next attempt in 5 s")
        assert stalled == {}  # one failure backs off; "stalled" only after the policy's stall_after failures
        assert hold_back(plan, profile, store, T0 + timedelta(seconds=10)) == ({}, {})
        for _n in range(BACKOFF_POLICY.stall_after - 1):
            store.update_backoff("high", lambda old: after_failure(old, "boom", digest, T0, BACKOFF_POLICY))
        deferred, stalled = hold_back(plan, profile, store, T0 + timedelta(seconds=5))
        assert set(stalled) == {"high"} and stalled["high"].startswith(
            f"stalled after {BACKOFF_POLICY.stall_after} failures")


def test_a_running_service_that_fails_its_probes_is_restarted_with_backoff(env):
    port = free_port()
    service = fake_service(port, always_on=True, unhealthy_after=1.5)
    service["failure_threshold"] = 2
    profile = make_profile({"flaky": service})

    async def main():
        async with env.runtime() as rt:
            first = await rt.reconcile(profile)
            assert first.outcomes["start:flaky"].status == "done"
            pid = rt.store.get_instance("flaky").pid
            await asyncio.sleep(1.6)  # the service now answers 503 while still running
            env.clock.advance(5)
            miss = await rt.reconcile(profile)  # one failed probe: below the threshold, nothing done
            assert miss.plan.actions == [] and rt.store.get_instance("flaky").pid == pid
            env.clock.advance(5)
            await rt.reconcile(profile)  # second in a row: stopped, counted as a failure, held back
            backoff = rt.store.get_backoff("flaky")
            assert backoff.failures == 1 and "failed 2 health probes in a row" in backoff.last_error
            assert rt.store.get_instance("flaky") is None or rt.store.get_instance("flaky").pid != pid
            env.clock.advance(11)  # past the 10 s backoff: started again
            again = await rt.reconcile(profile)
            assert again.outcomes["start:flaky"].status == "done"
            return pid, rt.store.get_instance("flaky").pid

    old, new = asyncio.run(main())
    assert new != old
    assert env.launches("flaky") == 2
