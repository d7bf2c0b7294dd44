"""An operator's commands end to end: stop, start, restart, reset, logs and down, with real processes.

A server (``watch --api``) runs ``db`` (always on), ``app`` (always on,
``depends_on: [db]``), ``tts`` (leased only) and an adopted fake Ollama
started beforehand. The commands run as a person would type them, as
subprocesses, against real HTTP; what they did is read from the processes
themselves (their pids alive or not) and the store.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store
from reconciler.testing.ports import is_listening
from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, alive, host, ollama_block, wait_until  # noqa: F401

DB_APP = """\
  app:
    max_mb: 512
    priority: 2
    always_on: true
    depends_on: [db]
    start_timeout_s: 10
    probe_interval_s: 0.5
    probe_timeout_s: 0.5
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name app"
      port: {port}
"""


def cli(host: Host, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=host.env())


def held(host: Host) -> dict[str, Any]:
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        return store.holds()


def running(server: ApiRun, *names: str) -> dict[str, Any]:
    return server.wait_status(lambda s: all(any(i["service"] == n and i["state"] == "running" and i["healthy"]
                                                for i in s["instances"]) for n in names),
                              f"{', '.join(names)} running")


def test_stop_start_restart_logs_down(host: Host) -> None:
    ollama_port = host.port()
    ollama = host.start_foreign("reconciler.testing.fake_ollama", "--port", str(ollama_port), sim_mb=512)
    wait_until(lambda: is_listening(ollama_port), what="the fake Ollama listening")
    host.write(profile(
        service("db", host.port(), mb=512, priority=1, always_on=True),
        DB_APP.format(port=host.port()),
        service("tts", host.port(), mb=512, priority=3),
        ollama_block("ollama", ollama_port, mb=512),
    ))
    server = ApiRun(host)
    running(server, "db", "app", "ollama")
    pids = host.pids()
    url = ("--url", server.url)

    # stop: db and what depends on it stop, dependents first; the hold is stored
    stopped = cli(host, "stop", "db", *url)
    assert stopped.returncode == 0, stopped.stderr
    assert "db stopped (with app, which depends on it)" in stopped.stdout
    assert "until `reconciler start db`" in stopped.stdout
    assert not alive(pids["db"]) and not alive(pids["app"]) and alive(ollama.pid)
    assert set(held(host)) == {"db"}
    server.run.wait_kind("instance.stopped", service="db")
    order = [e["service"] for e in server.run.events if e["kind"] == "instance.stopped"]
    assert order == ["app", "db"]
    status = server.status()
    reasons = {s["service"]: s["held"] for s in status["services"]}
    assert reasons["db"].startswith("stopped by an operator") and reasons["app"].startswith("needs db")
    assert "stop" in {e.get("verb") for e in server.run.events if e["kind"] == "operator.request"}

    # an adopted instance is never signalled: refused, nothing held
    adopted = cli(host, "stop", "ollama", *url)
    assert adopted.returncode == 1 and "409" in adopted.stderr and "adopted" in adopted.stderr
    assert set(held(host)) == {"db"} and alive(ollama.pid)
    unknown = cli(host, "stop", "nope", *url)
    assert unknown.returncode == 1 and "404" in unknown.stderr and "services: app, db, ollama, tts" in unknown.stderr

    # the hold survives a restart of the reconciler (always_on does not bring it back)
    server.run.signal(signal.SIGTERM)
    assert server.run.wait_exit() == 0
    server.close()
    server = ApiRun(host)
    url = ("--url", server.url)
    server.wait_status(lambda s: s["plan"] is not None, "a first plan")
    assert server.run.seen("watch.started")[0]["held"] == ["db"]  # said at start-up
    assert "db" not in host.pids() and "app" not in host.pids()
    assert "stopped by an operator" in cli(host, "why", "db", *url).stdout

    started = cli(host, "start", "db", *url)
    assert started.returncode == 0 and "db is running again" in started.stdout, started.stdout + started.stderr
    running(server, "db", "app")
    assert held(host) == {}

    # restart: a busy instance waits for its lease unless --now
    lease = server.lease("tts", holder="op-test", ttl_s=60)
    assert lease.status_code == 200, lease.text
    tts = host.pids()["tts"]
    waiting = cli(host, "restart", "tts", "--wait", "5", *url)
    assert waiting.returncode == 1 and "waits until its lease ends" in waiting.stdout, waiting.stdout
    assert host.pids()["tts"] == tts
    follow = subprocess.Popen([sys.executable, "-m", "reconciler", "logs", "tts", "-f", "-n", "1", "--state-dir",
                               str(host.state_dir)], env=host.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None and follow.stdout.readline()  # its last line: it follows from here
        now = cli(host, "restart", "tts", "--now", *url)
        assert now.returncode == 0 and "tts restarted" in now.stdout, now.stdout + now.stderr
        assert host.pids()["tts"] != tts and not alive(tts)
        assert "reconciler: starting tts" in follow.stdout.readline()  # the new launch's header, followed live
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(10)
        if follow.stdout is not None:
            follow.stdout.close()

    # logs: the file itself, and through the API
    logs = cli(host, "logs", "tts", "-n", "50", "--state-dir", str(host.state_dir))
    assert logs.returncode == 0 and logs.stdout.count("\n") >= 2, logs.stderr
    answer = server.http.get("/v1/services/tts/logs", params={"tail": 3}).json()
    assert answer["file"].endswith("logs/tts.log") and 1 <= len(answer["lines"]) <= 3
    assert server.http.get("/v1/services/nope/logs").status_code == 404
    missing = cli(host, "logs", "nope", "--state-dir", str(host.state_dir))
    assert missing.returncode == 1 and "no log for nope" in missing.stderr

    # down through the server (found from the state directory): ours stop, the adopted one stays
    ours = {name: pid for name, pid in host.pids().items() if name != "ollama"}
    down = cli(host, "down", "--state-dir", str(host.state_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "adopted, left running: ollama" in down.stdout and "asked the server" in down.stdout
    assert not any(alive(pid) for pid in ours.values()) and alive(ollama.pid)
    assert set(held(host)) == {"app", "db", "tts"}
    up = cli(host, "start", "--all", *url)
    assert up.returncode == 0 and "may run again" in up.stdout
    running(server, "db", "app")

    # down without a server: directly on the store, with the recorded profile and GPU
    server.run.signal(signal.SIGTERM)
    assert server.run.wait_exit() == 0
    server.close()
    ours = {name: pid for name, pid in host.pids().items() if name != "ollama"}
    assert set(ours) == {"app", "db"}
    direct = cli(host, "down", "--state-dir", str(host.state_dir))
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert "stopped app, db" in direct.stdout and "adopted, left running: ollama" in direct.stdout
    assert not any(alive(pid) for pid in ours.values()) and alive(ollama.pid)
    assert held(host) == {}  # not stored: the next serve starts what the profile wants
    again = cli(host, "down", "--state-dir", str(host.state_dir))
    assert again.returncode == 0 and "nothing of ours was running" in again.stdout


def test_down_refuses_a_watch_without_api(host: Host) -> None:
    host.write(profile(service("db", host.port(), mb=512, priority=1, always_on=True)))
    run = host.watch()
    run.wait_converged()
    refused = cli(host, "down", "--state-dir", str(host.state_dir))
    assert refused.returncode == 1
    assert f"pid {run.pid}" in refused.stderr and "serves no API" in refused.stderr
    assert alive(host.pids()["db"])
    nothing = cli(host, "down", "--state-dir", str(host.root / "elsewhere"))
    assert nothing.returncode == 0 and "nothing to stop" in nothing.stdout


def test_backoff_is_shown_and_reset(host: Host) -> None:
    sick = service("sick", host.port(), mb=256, priority=1, always_on=True, args="--refuse-health")
    host.write(profile(sick.replace("start_timeout_s: 10", "start_timeout_s: 1")))
    server = ApiRun(host)
    try:
        _backoff_shown_quiet_and_reset(host, server)
    finally:
        server.close()


def _backoff_shown_quiet_and_reset(host: Host, server: ApiRun) -> None:
    url = ("--url", server.url)
    status = server.wait_status(lambda s: any(x["backoff"] and x["backoff"]["next_try_at"] for x in s["services"]),
                                "sick backing off")
    backoff = status["services"][0]["backoff"]
    assert backoff["failures"] == 1 and not backoff["stalled"] and "healthy" in backoff["last_error"]
    assert 0 < backoff["next_try_in_s"] <= 10
    why = cli(host, "why", "sick", *url).stdout
    assert "Backing off: 1 failure, last error: " in why and "next try at " in why, why
    assert "The plan will start it" not in why and "reconciler reset sick" in why
    text = cli(host, "status", *url).stdout
    assert "FAILING" in text and "sick" in text and "reconciler reset SERVICE" in text
    assert not any(c["type"] == "stalled" for c in status["conditions"])  # one failure is not a stall

    # the memory its held-back start keeps is said so, in the status and in a refused VRAM lease, and /api/nodes
    # gives the same free figure
    status = server.wait_status(lambda s: bool(s["gpus"] and s["gpus"][0]["held_for"]), "memory held for sick")
    gpu = status["gpus"][0]
    assert gpu["held_for"] == ["256 MB held for start:sick"] and gpu["free_mb"] == 8192 - 256, gpu
    refused = server.http.post("/api/leases", json={"node_id": "local", "gpu_id": 0, "mb": 8192 - 128,
                                                     "service": "batch"})
    assert refused.status_code == 503 and "256 MB held for start:sick" in refused.json()["detail"], refused.text
    nodes = server.http.get("/api/nodes").json()["nodes"][0]["gpus"][0]
    assert nodes["vram_free_mb"] == 8192 - 256, nodes

    # quiet logs: the passes that only wait out the backoff are neither printed nor recorded
    server.run.wait_kind("backoff", service="sick")
    assert not server.run.wait_kind("pass.finished").get("quiet")  # the pass that failed is told
    waits = [server.run.wait_kind("pass.finished") for _ in range(3)]
    assert all(w["quiet"] and w["actions"] == ["start:sick"] for w in waits), waits
    with open_store(host.state_dir, SYSTEM_CLOCK) as store:
        recorded = [e for e in store.events(limit=1000) if e.kind in ("pass", "pass.finished")]
    assert len(recorded) <= 2, [e.message for e in recorded]

    reset = cli(host, "reset", "sick", *url)
    assert reset.returncode == 0 and "1 failure(s) forgotten" in reset.stdout, reset.stdout + reset.stderr
    server.run.wait_kind("operator.request", verb="reset")
    server.run.wait_kind("instance.launched", service="sick", timeout_s=5)  # at once, not after its 10 s
    nothing = cli(host, "reset", "nope", *url)
    assert nothing.returncode == 1 and "404" in nothing.stderr
