"""End to end (issue 8.3): the GPU set changes under the inventory — a condition, never a crash.

A ``watch`` on a simulated 8 GB GPU runs ``alpha`` and ``beta`` on GPU 0 and
stops (SIGTERM: the services keep running). ``beta`` is then removed from the
profile, and the next ``watch`` sees no GPU at all (``--gpu none``: what NVML
broken by a driver upgrade, or a forgotten ``--gpu``, looks like). It must not
crash or print a traceback pass after pass: what can be decided without the
GPU is done (``beta``, no longer wanted, is stopped), nothing is started on or
evicted from the GPU it cannot see (``alpha`` keeps running, the same process,
with a pending reason that names the GPU), and later passes keep saying so.
"""

from __future__ import annotations

import signal

from tests.e2e_support import Host, alive, host, profile_text, service_block  # noqa: F401


def test_a_gpu_that_disappears_is_a_condition_and_what_can_be_done_is_done(host: Host) -> None:
    ports = {"alpha": host.port(), "beta": host.port()}
    host.write(profile_text(service_block("alpha", ports["alpha"]), service_block("beta", ports["beta"])))
    first = host.watch()
    first.wait_converged()
    pids = host.pids()
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0 and all(alive(pid) for pid in pids.values())

    host.write(profile_text(service_block("alpha", ports["alpha"])))  # beta leaves the profile
    second = host.watch("--gpu", "none", resync_s=0.5)
    stopped = second.wait_kind("instance.stopped", service="beta")
    assert not alive(pids["beta"]), stopped
    for _ in range(3):  # pass after pass: a condition with a reason, never a failure
        finished = second.wait_kind("pass.finished")
        reasons = {p["service"]: p["reason"] for p in finished["pending"]}
        assert "GPU 0" in reasons.get("alpha", ""), finished
    assert not second.seen("pass.failed")
    assert host.pids() == {"alpha": pids["alpha"]} and alive(pids["alpha"])
    assert second.process.poll() is None and "Traceback" not in second.stderr()
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0
