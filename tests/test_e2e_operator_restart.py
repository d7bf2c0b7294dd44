"""End to end (issue 8.12): what a drained restart's pending reason tells the operator to run works.

An edit changes the launch spec of a *busy* instance: it keeps serving, the restart
waits for its lease, and the pending reason says "`reconciler restart llm --now`
restarts it now". That command (``POST /v1/services/llm/restart``) is real: without
``--now`` it leaves the busy instance alone (once idle it restarts), with ``--now``
the instance restarts at once and its lease is kept for the restarted instance. An
idle instance restarts when asked even though nothing changed (a wedged server).
A service that is unknown or has nothing running is a one-line error, exit 1.
"""

from __future__ import annotations

import subprocess
import sys

from reconciler.testing.ports import is_listening
from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, alive, host, ollama_block, profile_text, wait_until  # noqa: F401


def cli(api: ApiRun, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args, "--url", api.url],
                          capture_output=True, text=True, timeout=30)


def test_reconciler_restart_now_and_when_idle(host: Host) -> None:
    ports = {"llm": host.port(), "tts": host.port()}
    blocks = lambda delay: profile(  # noqa: E731 - the profile, with llm's launch spec as given
        service("llm", ports["llm"], mb=2048, priority=1, always_on=True, args=f"--startup-delay {delay}"),
        service("tts", ports["tts"], mb=1024, priority=2))
    host.write(blocks(0))
    api = ApiRun(host)
    try:
        api.wait_converged()
        first = host.pids()["llm"]
        lease = api.lease("llm", holder="kiwi", ttl_s=300)
        assert lease.status_code == 200, lease.text

        host.write(blocks(0.1))  # a launch spec edit while llm is busy: it drains
        status = api.wait_status(lambda s: any(p["service"] == "llm" for p in s["pending"]), "llm's restart waits")
        [reason] = [p["reason"] for p in status["pending"] if p["service"] == "llm"]
        assert "waits until its lease ends; `reconciler restart llm --now` restarts it now" in reason, reason

        later = cli(api, "restart", "llm")
        assert later.returncode == 0, later.stderr
        assert later.stdout.strip() == ("llm restarts once its 1 lease(s) end; new requests wait for the restarted "
                                        "instance")
        api.wait_status(lambda s: any(p["service"] == "llm" for p in s["pending"]), "still waiting")
        assert host.pids()["llm"] == first and alive(first)

        now = cli(api, "restart", "llm", "--now")
        assert now.returncode == 0, now.stderr
        assert now.stdout.strip() == "llm restarts now; its 1 lease(s) are kept for the restarted instance"
        wait_until(lambda: host.pids().get("llm") not in (None, first), what="llm restarted")
        status = api.wait_converged()
        second = host.pids()["llm"]
        assert not alive(first)
        assert [lease_["id"] for lease_ in status["leases"]] == [lease.json()["id"]]  # kept
        assert api.http.delete(f"/v1/leases/{lease.json()['id']}").status_code == 200

        idle = cli(api, "restart", "llm")  # nothing changed, nothing held: at once
        assert idle.returncode == 0 and idle.stdout.strip() == "llm restarts now", idle
        wait_until(lambda: host.pids().get("llm") not in (None, second), what="llm restarted when idle")
        api.wait_converged()
        assert host.instances()["llm"].restart is None  # the restarted instance carries no request

        unknown = cli(api, "restart", "nope")
        assert unknown.returncode == 1
        assert unknown.stderr.strip().endswith("no service 'nope' in profile 'api' (services: llm, tts)"), unknown
        idle_service = cli(api, "restart", "tts")
        assert idle_service.returncode == 1 and "tts is not running: there is nothing to restart" in \
            idle_service.stderr, idle_service
        assert "Traceback" not in unknown.stderr + idle_service.stderr + api.run.stderr()
    finally:
        api.close()


def test_an_adopted_instance_is_never_restarted(host: Host) -> None:
    """``reconciler restart`` of an adopted Ollama is refused (409, exit 1): it is not ours to signal."""
    port = host.port()
    ollama = host.start_foreign("reconciler.testing.fake_ollama", "--port", str(port), sim_mb=1024)
    wait_until(lambda: is_listening(port), what="the fake Ollama listening")
    host.write(profile_text(ollama_block("ollama", port)))
    api = ApiRun(host)
    try:
        api.wait_converged()
        assert host.instances()["ollama"].origin == "adopted"
        refused = api.http.post("/v1/services/ollama/restart", json={"now": True})
        assert refused.status_code == 409 and "never signals a process it did not start" in refused.json()["detail"]
        said = cli(api, "restart", "ollama", "--now")
        assert said.returncode == 1 and "ollama is adopted" in said.stderr and "Traceback" not in said.stderr
        assert host.instances()["ollama"].restart is None and alive(ollama.pid)
    finally:
        api.close()
