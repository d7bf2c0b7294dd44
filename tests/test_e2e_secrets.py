"""Invariant 8 end to end: a value read from ``${VAR}`` never appears in any output.

A real ``reconciler serve`` runs a service whose launch reads two secrets from
the environment (one into an argument, one into the environment of the
process). Then an edit switches both to other secrets, which restarts the
service. Every output a person or a program can read is collected — the
event lines on stdout, the event log replayed over HTTP, the status and plan
documents, the service's log file, ``reconciler plan`` and ``reconciler
observe`` — and none may contain a secret value; the ``${VAR}`` references
show instead. ``observe --show-secrets`` is the one explicit way to print them
(and proves the test would see them).
"""

from __future__ import annotations

import json
import subprocess
import sys

from reconciler.testing.ports import free_port
from tests.api_support import ApiRun
from tests.e2e_support import Host, host  # noqa: F401 (fixture)

SECRETS = {"TOKEN_A": "tok-a-0f9e8d7c6b", "TOKEN_B": "tok-b-5a4b3c2d1e",
           "KEY_A": "sk-a-1234567890", "KEY_B": "sk-b-0987654321"}

PROFILE = """\
schema_version: 1
name: secrets
vram_total_mb: 8192
eviction_timeout_s: 2
services:
  svc:
    max_mb: 512
    priority: 1
    always_on: true
    probe_interval_s: 0.5
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name ${{{token}}}"
      env: {{API_KEY: "${{{key}}}"}}
      port: {port}
"""


def test_no_expanded_value_reaches_any_output(host: Host, monkeypatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    host.write(PROFILE.format(port=port, token="TOKEN_A", key="KEY_A"))
    api = ApiRun(host)
    try:
        api.wait_converged()
        host.write(PROFILE.format(port=port, token="TOKEN_B", key="KEY_B"))  # both secrets change: a restart
        restarted = api.run.wait_for(lambda e: e["kind"] == "action.finished" and e["action"] == "restart:svc",
                                     what="the restart")
        assert restarted["status"] == "done"
        api.wait_converged()
        outputs = {
            "events on stdout": json.dumps(api.run.events),
            "event log over HTTP": _replay(api),
            "status": api.http.get("/v1/status").text,
            "plan": api.http.get("/v1/plan").text,
            # what the reconciler writes there (the service's own lines are the service's business)
            "service log": "\n".join(line for line in (host.state_dir / "logs" / "svc.log").read_text().splitlines()
                                     if line.startswith("--- ")),
            "observe": _cli(host, "observe", "--profile", str(host.profile), "--gpu", "sim:8192",
                            "--state-dir", str(host.state_dir)),
        }
        revealed = _cli(host, "observe", "--profile", str(host.profile), "--gpu", "sim:8192",
                        "--state-dir", str(host.state_dir), "--show-secrets")
    finally:
        api.close()
    reason = next(e for e in api.run.events if e["kind"] == "action.started" and e["action"] == "restart:svc")
    assert "${TOKEN_A}" in reason["message"] and "${TOKEN_B}" in reason["message"]
    assert "env API_KEY changed" in reason["message"]
    for where, text in outputs.items():
        leaked = [name for name, value in SECRETS.items() if value in text]
        assert not leaked, f"{where} shows the value of {leaked}"
    assert SECRETS["TOKEN_B"] in revealed and SECRETS["KEY_B"] in revealed  # the test can see them when asked


def _replay(api: ApiRun) -> str:
    """The stored event log as the event stream replays it (read until the replay is done)."""
    stored = sum(1 for e in api.run.events if e.get("id") is not None)
    lines: list[str] = []
    with api.http.stream("GET", "/v1/events", params={"since": 0}, timeout=10) as response:
        for line in response.iter_lines():
            lines.append(line)
            if sum(1 for x in lines if x.startswith("data: ")) >= stored:
                break
    return "\n".join(lines)


def _cli(host: Host, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "reconciler", *args], env=host.env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout
