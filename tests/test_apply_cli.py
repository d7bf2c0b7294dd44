"""`reconciler apply` as a real command: a real service on a simulated GPU, a real state directory.

The simulated GPU is large (sim:65536): it counts every process on this machine
that declares simulated memory, and other programs may be running some.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store
from reconciler.testing.ports import free_port
from tests.runtime_support import env, listeners  # noqa: F401 (fixture)

GPU = "sim:65536"


def reconciler(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                          timeout=timeout)


def write_profile(path, port: int, *, startup_delay: float = 0.2, services: bool = True):
    body = (
        "schema_version: 1\nname: demo\nvram_total_mb: 8192\neviction_timeout_s: 2\nservices:\n"
        "  svc:\n    max_mb: 2048\n    priority: 2\n    always_on: true\n"
        f"    managed:\n      type: process\n      exec_path: {sys.executable}\n"
        f"      args_template: -m reconciler.testing.service --port {port} --startup-delay {startup_delay}\n"
        f"      port: {port}\n"
    ) if services else "schema_version: 1\nname: empty\nservices: {}\n"
    path.write_text(body)
    return path


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def apply(profile, state, *extra: str) -> subprocess.CompletedProcess:
    return reconciler("apply", "--profile", str(profile), "--gpu", GPU, "--state-dir", str(state), *extra)


def test_apply_wait_starts_the_service_and_leaves_it_running(env, tmp_path):
    port = free_port()
    profile = write_profile(tmp_path / "profile.yaml", port)
    result = apply(profile, env.state_dir, "--wait", "--timeout", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "+ start:svc  done" in result.stdout and "converged" in result.stdout
    assert answers(port)  # still running after apply exited
    with open_store(env.state_dir, SYSTEM_CLOCK) as store:
        [instance] = store.instances()
    assert instance.state == "running" and listeners(port) == [instance.pid]
    again = apply(profile, env.state_dir, "--format", "json")
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["exit_code"] == 0 and data["passes"][0]["plan"]["actions"] == []
    assert listeners(port) == [instance.pid]


def test_dry_run_prints_the_plan_and_touches_nothing(env, tmp_path):
    port = free_port()
    profile = write_profile(tmp_path / "profile.yaml", port)
    result = apply(profile, env.state_dir, "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "start:svc" in result.stdout
    assert not env.state_dir.exists() and not answers(port)


def test_an_invalid_profile_exits_1_with_its_location_and_touches_nothing(env, tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("schema_version: 1\nname: bad\nservices:\n  svc:\n    max_mb: 10\n    priorty: 1\n")
    result = apply(profile, env.state_dir, "--wait")
    assert result.returncode == 1
    assert f"{profile}:6:5:" in result.stderr and "priority" in result.stderr
    assert not env.state_dir.exists()


def test_an_empty_profile_is_refused_unless_allowed(env, tmp_path):
    profile = write_profile(tmp_path / "empty.yaml", 0, services=False)
    refused = apply(profile, env.state_dir)
    assert refused.returncode == 1 and "--allow-empty" in refused.stderr
    assert not env.state_dir.exists()
    allowed = apply(profile, env.state_dir, "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr


def test_apply_killed_mid_start_is_recovered_by_the_next_apply_without_a_duplicate(env, tmp_path):
    port = free_port()
    profile = write_profile(tmp_path / "profile.yaml", port, startup_delay=1.5)
    args = ["apply", "--profile", str(profile), "--gpu", GPU, "--state-dir", str(env.state_dir), "--wait"]
    first = subprocess.Popen([sys.executable, "-m", "reconciler", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not listeners(port):  # launched; not healthy before startup_delay
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)  # a crash: nothing is finished, nothing cleaned up
    first.wait()
    [launched] = listeners(port)
    result = apply(profile, env.state_dir, "--wait", "--timeout", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert listeners(port) == [launched] and answers(port)
    assert env.launches("svc") == 1
    with open_store(env.state_dir, SYSTEM_CLOCK) as store:
        assert store.open_intents() == [] and store.get_instance("svc").pid == launched
