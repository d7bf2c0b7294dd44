"""End to end: the reconciler killed with SIGKILL in the middle of an apply loses nothing (invariant 5).

The watch is killed while a slow service it just launched is still starting
(its start intent is open). A new watch on the same state directory finds
that process again — no second copy, no orphan — lets it finish starting,
and the lease put in the store beforehand is still there, unchanged.
"""

from __future__ import annotations

import signal
from datetime import timedelta

from reconciler.core.snapshot import Lease
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store
from tests.api_support import ApiRun
from tests.api_support import profile as api_profile
from tests.api_support import service as api_service
from tests.e2e_support import Host, alive, host, profile_text, service_block  # noqa: F401


def test_sigkill_mid_apply_then_restart_finds_everything(host: Host) -> None:
    ports = {"alpha": host.port(), "slow": host.port()}
    host.write(
        profile_text(
            service_block("alpha", ports["alpha"], priority=1),
            service_block("slow", ports["slow"], args="--startup-delay 3", start_timeout_s=15),
        )
    )
    lease = Lease(id="L-keep", service="alpha", holder="e2e", gpu=0, expires_at=SYSTEM_CLOCK.now() + timedelta(hours=1))
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        assert store.grant_lease(lease, max_concurrent=1)

    first = host.watch()
    launched = first.wait_kind("instance.launched", service="slow")
    first.kill()  # SIGKILL, mid-apply: slow's start intent is open, it is not healthy yet
    assert alive(launched["pid"])
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        assert "start:slow" in [i.action_id for i in store.open_intents()]

    second = host.watch()
    recovered = second.wait_kind("intent.recovered", service="slow")
    assert recovered["outcome"] == "recovered"
    second.wait_kind("instance.healthy", service="slow")  # a later pass saw it finish starting
    second.wait_converged()
    assert not second.seen("instance.launched", service="slow")  # not started a second time
    pids = host.pids()
    assert pids["slow"] == launched["pid"]
    for name, port in ports.items():
        assert host.listeners(port) == [pids[name]], name
    assert sorted(p.pid for p in host.our_processes()) == sorted(pids.values())  # no orphans
    assert {i.state for i in host.instances().values()} == {"running"}
    assert host.leases() == [lease]
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        assert store.open_intents() == []
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0


def test_sigterm_mid_start_exits_0_and_the_next_watch_finishes_it(host: Host) -> None:
    port = host.port()
    host.write(profile_text(service_block("slow", port, args="--startup-delay 4", start_timeout_s=15)))
    first = host.watch()
    launched = first.wait_kind("instance.launched", service="slow")
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0  # within its grace: the pass stops waiting at its budget
    assert first.events[-1]["kind"] == "watch.stopped" and alive(launched["pid"])

    second = host.watch()
    second.wait_kind("instance.healthy", service="slow")
    assert not second.seen("instance.launched")
    assert host.pids() == {"slow": launched["pid"]} and host.listeners(port) == [launched["pid"]]
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0


def test_a_lease_answered_200_survives_a_sigkill_right_after(host: Host) -> None:
    """Issue 10: the ledger writes a grant through before answering, so a kill -9 the moment the 200 arrives
    loses nothing: the next run holds every lease answered (VRAM and service leases alike), and still
    counts them against the GPU."""
    port = host.port()
    host.write(api_profile(api_service("alpha", port, priority=1, max_concurrent=8, always_on=True)))
    first = ApiRun(host)
    try:
        first.wait_converged()
        answered = []
        for n in range(5):
            vram = first.http.post("/api/leases", json={"node_id": "local", "gpu_id": 0, "mb": 100 + n,
                                                        "service": f"app-{n}", "ttl_s": 0})
            assert vram.status_code == 200, vram.text
            answered.append(vram.json()["lease"]["lease_id"])
            native = first.lease("alpha", holder=f"h{n}", ttl_s=3600)
            assert native.status_code == 200, native.text
            answered.append(native.json()["id"])
        first.run.kill()  # SIGKILL at once: no shutdown, no pending flush
    finally:
        first.close()
    second = ApiRun(host)
    try:
        status = second.wait_converged()
        assert sorted(lease["id"] for lease in status["leases"]) == sorted(answered)
        assert status["gpus"][0]["leased_mb"] == sum(100 + n for n in range(5))
    finally:
        second.close()
        second.run.signal(signal.SIGTERM)
        second.run.wait_exit()
