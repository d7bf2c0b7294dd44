"""End to end: the state store's files misbehave under a real ``reconciler serve``/``watch``.

* At start-up a state directory or file the store cannot use is a clear
  error (exit 1, the file named, what to do), never a traceback.
* While serving, nothing done to the files beside ``state.db`` kills the
  server (SQLite's WAL index, ``state.db-shm``, was mapped into memory, and a
  truncated mapping is a SIGBUS); a store that fails is reported, the API
  answers 503, the services keep running, and once the cause is gone the
  loop carries on by itself.
* ``state.db`` deleted while serving is noticed and written back, leases
  and all; lost together with the reconciler (``kill -9``, then deleted),
  the next reconciler finds its running services again by the marker in
  their environment: same pid, no second start, stopped when removed from
  the profile.

The suite runs as root here, where permission bits stop nothing: an unusable
file is made by its type (a directory where SQLite wants a file).
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from datetime import timedelta

from reconciler.core.snapshot import Lease
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store
from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, alive, host, profile_text, service_block, wait_until  # noqa: F401

FILES = ("state.db", "state.db-journal", "state.db-wal", "state.db-shm")


def cli(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], env=host.env(), capture_output=True,
                          text=True, timeout=60)


def test_an_unusable_state_directory_or_file_is_a_clear_error_at_start(host: Host) -> None:
    host.write(profile_text(service_block("alpha", host.port())))
    not_a_dir = host.root / "state-file"
    not_a_dir.write_text("a file where the state directory should be\n")
    host.state_dir.mkdir()
    (host.state_dir / "state.db-journal").mkdir()  # the rollback journal cannot be opened
    for state_dir, culprit in ((not_a_dir, not_a_dir), (host.state_dir, host.state_dir / "state.db-journal")):
        for command in ("serve", "watch"):
            args = [command, "--profile", str(host.profile), "--gpu", "sim:8192", "--state-dir", str(state_dir)]
            if command == "serve":
                args += ["--listen", "127.0.0.1:0"]
            result = cli(host, *args)
            assert result.returncode == 1, (command, result)
            assert "Traceback" not in result.stderr, result.stderr
            assert str(culprit) in result.stderr and "--state-dir" in result.stderr, result.stderr
    assert host.our_processes() == []  # nothing was started


def test_a_store_failure_while_serving_is_reported_and_the_services_keep_running(host: Host) -> None:
    port = host.port()
    host.write(profile(service("alpha", port, always_on=True), service("beta", host.port())))
    api = ApiRun(host)
    try:
        pid = api.wait_converged()["instances"][0]["pid"]
        server = api.run.process.pid
        limits = resource.prlimit(server, resource.RLIMIT_FSIZE)
        resource.prlimit(server, resource.RLIMIT_FSIZE, (1024, limits[1]))  # a disk that takes no more bytes
        refused = api.lease("beta", holder="t", wait_s=1)  # a lease is written before it is granted
        assert refused.status_code == 503, refused.text
        assert "state store" in refused.json()["detail"] and "disk is not full" in refused.json()["detail"]
        failed = api.run.wait_kind("store.failed")
        assert str(host.state_dir / "state.db") in failed["message"] and "disk is not full" in failed["message"], \
            failed
        assert api.run.process.poll() is None and alive(pid)
        assert "Traceback" not in api.run.stderr()
        resource.prlimit(server, resource.RLIMIT_FSIZE, limits)  # room again: the loop carries on by itself
        api.run.wait_kind("store.recovered")
        granted = api.lease("beta", holder="t", wait_s=10)
        assert granted.status_code == 200, granted.text
        assert api.status()["instances"][0]["pid"] == pid and alive(pid)
    finally:
        api.close()


def test_state_db_deleted_while_serving_is_noticed_and_written_back(host: Host) -> None:
    port = host.port()
    host.write(profile_text(service_block("alpha", port)))
    lease = Lease(id="L-keep", service="alpha", holder="e2e", gpu=0, expires_at=SYSTEM_CLOCK.now() + timedelta(hours=1))
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        assert store.grant_lease(lease, max_concurrent=1)
    run = host.watch()
    launched = run.wait_kind("instance.launched", service="alpha")
    run.wait_converged()
    for name in FILES:
        (host.state_dir / name).unlink(missing_ok=True)
    restored = run.wait_kind("store.restored")
    db = host.state_dir / "state.db"
    assert f"{db} was deleted or replaced while running" in restored["message"], restored
    wait_until(lambda: f"{db} was deleted or replaced while running" in run.stderr(), what="the log line")
    run.kill()  # SIGKILL: what is in the file now is what the next run finds
    assert host.leases() == [lease]
    assert host.pids() == {"alpha": launched["pid"]}
    second = host.watch()
    second.wait_converged()
    assert not second.seen("instance.launched") and host.pids() == {"alpha": launched["pid"]}
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0


def test_a_store_lost_with_the_reconciler_finds_its_services_again_by_their_marker(host: Host) -> None:
    ports = {"alpha": host.port(), "beta": host.port()}
    host.write(profile_text(service_block("alpha", ports["alpha"]), service_block("beta", ports["beta"])))
    first = host.watch()
    first.wait_converged()
    pids = host.pids()
    first.kill()  # SIGKILL
    for name in FILES:
        (host.state_dir / name).unlink(missing_ok=True)

    second = host.watch()
    for name in ports:
        found = second.wait_kind("instance.recovered", service=name)
        assert found["pid"] == pids[name], found
    second.wait_converged()
    assert not second.seen("instance.launched")  # no second copy
    assert host.pids() == pids
    for name, port in ports.items():
        assert host.listeners(port) == [pids[name]], name
    assert {i.origin for i in host.instances().values()} == {"started"}  # ours: it may be stopped

    host.write(profile_text(service_block("alpha", ports["alpha"])))  # beta leaves the profile
    second.wait_kind("instance.stopped", service="beta")
    wait_until(lambda: not alive(pids["beta"]), what="beta stopped")
    assert alive(pids["alpha"]) and host.pids() == {"alpha": pids["alpha"]}
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0
