"""End to end: a killed service comes back after its backoff; one that keeps crashing stalls, no hot loop.

Invariant 6 on a real host: a managed service killed with SIGKILL is noticed
by the next liveness pass, counted as a failure, and started again once its
backoff (10 s for the first failure) has passed. A service that dies before
it is ever healthy is not relaunched in a loop: over a few seconds it is
launched once, and after five failures it is reported as stalled. To see
"stalled" without minutes of real backoff, four failures of the very same
launch spec are put in the store first.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

from reconciler.core.backoff import DEFAULT_POLICY as BACKOFF_POLICY
from reconciler.core.backoff import after_failure
from reconciler.core.launch import launch_digest as spec_hash
from reconciler.core.launch import launch_spec
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.loading import load_profile
from reconciler.store import open_store
from tests.e2e_support import Host, alive, host, profile_text, service_block  # noqa: F401

CRASH = "--refuse-health --crash-after 0.3"


def _launches(host: Host, service: str) -> int:
    log = host.state_dir / "logs" / f"{service}.log"
    return log.read_text().count(f"reconciler: starting {service}:") if log.exists() else 0


def test_a_killed_service_is_restarted_after_its_backoff(host: Host) -> None:
    port, other = host.port(), host.port()
    host.write(profile_text(service_block("alpha", port, priority=1), service_block("beta", other)))
    run = host.watch()
    run.wait_converged()
    before = host.pids()
    os.kill(before["alpha"], signal.SIGKILL)
    gone = run.wait_kind("instance.gone", service="alpha")
    backoff = run.wait_kind("backoff", service="alpha")
    assert backoff["failures"] == 1 and not backoff["stalled"] and backoff["next_attempt_at"]
    assert run.events.index(gone) < run.events.index(backoff)
    restarted = run.wait_kind("action.finished", timeout_s=25, action="start:alpha")
    assert restarted["status"] == "done"
    waited = (time.time() - _epoch(gone["ts"]))
    assert waited >= 0.9 * BACKOFF_POLICY.base_s, f"restarted after {waited:.1f} s, before its backoff"
    after = host.pids()
    assert after["alpha"] != before["alpha"] and alive(after["alpha"])
    assert after["beta"] == before["beta"]
    assert host.listeners(port) == [after["alpha"]]
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        assert store.get_backoff("alpha").failures == 1  # on record until it stays healthy long enough
    run.signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_a_crashing_service_stalls_without_a_hot_loop(host: Host) -> None:
    ports = {name: host.port() for name in ("stalls", "crashes", "fine")}
    host.write(
        profile_text(
            service_block("stalls", ports["stalls"], args=CRASH, start_timeout_s=3),
            service_block("crashes", ports["crashes"], args=CRASH, start_timeout_s=3),
            service_block("fine", ports["fine"]),
        )
    )
    _seed_failures(host, "stalls", BACKOFF_POLICY.stall_after - 1)
    run = host.watch()
    first = run.wait_kind("pass.finished", reason="start")
    assert first["outcomes"].get("failed") == 2 and first["outcomes"].get("done") == 1
    [stalled] = run.seen("backoff", service="stalls")
    assert stalled["stalled"] and stalled["failures"] == BACKOFF_POLICY.stall_after
    [backing_off] = run.seen("backoff", service="crashes")
    assert not backing_off["stalled"] and backing_off["failures"] == 1
    # a few seconds of liveness passes: each says why, none launches again
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        report = run.wait_kind("pass.finished")
    assert set(report["stalled"]) == {"stalls"}  # "stalled" only after stall_after failures, not a first backoff
    assert report["stalled"]["stalls"].startswith("stalled after 5 failures")
    assert report["quiet"] and report["actions"] == ["start:crashes", "start:stalls"]  # waiting: not told again
    assert _launches(host, "stalls") == 1 and _launches(host, "crashes") == 1
    assert set(host.pids()) == {"fine"}
    run.signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def _seed_failures(host: Host, service: str, count: int) -> None:
    """``count`` earlier failures of exactly the launch spec the runtime will use (GPU 0, no model)."""
    profile = load_profile(host.profile, environ=host.env())
    digest = spec_hash(launch_spec(service, profile.services[service], 0, None))
    long_ago = SYSTEM_CLOCK.now() - timedelta(hours=1)
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        for _ in range(count):
            store.update_backoff(service, lambda old: after_failure(old, "seeded by the test", digest, long_ago,
                                                                     BACKOFF_POLICY))


def _epoch(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
