"""End to end: ``watch --profiles DIR`` picks the profile that fits the GPU, and picks again on changes.

A simulated 8192 MB GPU with a 4096 MB profile in the directory runs that
one; once an 8192 MB profile is saved next to it, the watch switches to it
(its services start, the small one's stop); a broken file in the directory
blocks detection and the profile in force stays.
"""

from __future__ import annotations

import signal
import sys

from tests.e2e_support import Host, WatchRun, host, profile_text, service_block  # noqa: F401


def test_detects_and_switches_profiles(host: Host) -> None:
    small_port, big_port = host.port(), host.port()
    directory = host.profile.parent
    small = profile_text(service_block("small", small_port), name="small").replace("8192", "4096")
    (directory / "small.yaml").write_text(small)
    argv = [sys.executable, "-m", "reconciler", "watch", "--profiles", str(directory), "--gpu", "sim:8192",
            "--state-dir", str(host.state_dir), "--events", "json"]
    run = WatchRun(argv, host.env(), host.root / "watch.stderr")
    host.runs.append(run)
    started = run.wait_kind("watch.started")
    assert started["profile"] == "small" and "4096 MB profile small.yaml" in started["detected"]
    run.wait_converged()
    assert set(host.pids()) == {"small"}

    (directory / "big.yaml").write_text(profile_text(service_block("big", big_port), name="big"))
    reloaded = run.wait_kind("profile.reloaded")
    assert reloaded["profile"] == "big" and reloaded["path"].endswith("big.yaml")
    switched = run.wait_kind("pass.finished", reason="profile")
    assert sorted(switched["actions"]) == ["start:big", "stop:small"]
    assert set(host.pids()) == {"big"}

    (directory / "broken.yaml").write_text("schema_version: 1\nname: [\n")
    rejected = run.wait_kind("profile.rejected")
    assert rejected["diagnostics"][0]["file"].endswith("broken.yaml") and rejected["keeping"] == "profile big"
    run.signal(signal.SIGTERM)
    assert run.wait_exit() == 0
    assert set(host.pids()) == {"big"}
