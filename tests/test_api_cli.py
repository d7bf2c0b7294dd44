"""``reconciler status``, ``lease`` and ``why`` against a running server (real processes, real HTTP).

The server (``watch --api``) runs ``llm`` (2000 MB, priority 1, always on)
and knows ``tts`` (6500 MB, priority 2), which cannot fit beside llm.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, wait_until


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with Host(tmp_path_factory.mktemp("api-cli")) as host:
        host.write(profile(
            service("llm", host.port(), mb=2000, priority=1, always_on=True),
            service("tts", host.port(), mb=6500, priority=2),
        ))
        server = ApiRun(host)
        server.wait_converged()
        try:
            yield server
        finally:
            server.close()


def cli(api: ApiRun, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args, "--url", api.url],
                          capture_output=True, text=True, timeout=timeout_s)


@contextmanager
def start_cli(api: ApiRun, *args: str) -> Iterator[subprocess.Popen]:
    """The command running in the background; killed (if still running) and its pipes closed afterwards."""
    with subprocess.Popen([sys.executable, "-m", "reconciler", *args, "--url", api.url],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def test_status_prints_tables_and_json(api: ApiRun) -> None:
    result = cli(api, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("node local · profile api · observed ")
    assert any(line.split()[:2] == ["GPU", "NAME"] for line in lines)
    llm = next(line for line in lines if line.startswith("llm "))
    assert llm.split()[1:5] == ["running", "ok", "0", "started"]
    document = json.loads(cli(api, "status", "--format", "json").stdout)
    assert document["profile"] == "api" and document["instances"][0]["service"] == "llm"


def test_status_without_a_server_says_so(api: ApiRun) -> None:
    result = subprocess.run([sys.executable, "-m", "reconciler", "status", "--url", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no reconciler API at http://127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr


def test_lease_prints_the_url_renews_and_releases_on_ctrl_c(api: ApiRun) -> None:
    with start_cli(api, "lease", "llm", "--ttl", "1.2", "--holder", "cli-test") as process:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), process.stderr.read()
        assert httpx.get(url + "/health").status_code == 200
        [lease] = api.status()["leases"]
        assert lease["holder"] == "cli-test"
        time.sleep(2.0)  # longer than the TTL: only renewals keep it
        [still] = api.status()["leases"]
        assert still["id"] == lease["id"] and still["remaining_s"] > 0.2
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert "released lease" in process.stderr.read()
    assert api.status()["leases"] == []


def test_lease_refused_prints_the_reason(api: ApiRun) -> None:
    result = cli(api, "lease", "tts", "--wait", "0.5")
    assert result.returncode == 1
    assert "503" in result.stderr and "needs 6500 MB on GPU 0" in result.stderr
    assert result.stdout == ""
    assert api.status()["demands"] == []


def test_ctrl_c_while_waiting_withdraws_the_request(api: ApiRun) -> None:
    with start_cli(api, "lease", "tts", "--wait", "30", "--holder", "impatient") as process:
        api.wait_status(lambda s: [d["holder"] for d in s["demands"]] == ["impatient"], "the request waits", 10)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
    api.wait_status(lambda s: not s["demands"], "the demand is withdrawn", 5)


def test_why_explains_running_waiting_and_unknown(api: ApiRun) -> None:
    running = cli(api, "why", "llm")
    assert running.returncode == 0
    assert running.stdout.splitlines()[0].startswith("llm is running (healthy) on GPU 0, started by the reconciler")
    assert "Running, nothing to do: it is always_on." in running.stdout

    api.wait_status(lambda s: not any(p["service"] == "tts" for p in s["pending"]), "no plan about tts", 10)
    idle = cli(api, "why", "tts")
    assert idle.stdout.splitlines() == [
        "tts is not running.", "Nothing to do: nothing wants it (not always_on, no lease, no lease request)."]

    with start_cli(api, "lease", "tts", "--wait", "20", "--holder", "batch") as waiting:
        wait_until(lambda: any(p["service"] == "tts" for p in api.status()["pending"]), 10, "tts pending")
        why = cli(api, "why", "tts")
        assert "It waits: needs 6500 MB on GPU 0" in why.stdout and "llm (priority 1)" in why.stdout, why.stdout
        waiting.send_signal(signal.SIGINT)
        waiting.wait(10)

    unknown = cli(api, "why", "nope")
    assert unknown.returncode == 1 and "'nope' is not in profile 'api'" in unknown.stderr
    api.wait_status(lambda s: not s["demands"], "nothing left", 5)
