"""``reconciler status``, ``lease`` and ``why`` against a running server (real processes, real HTTP).

The server (``watch --api``) runs ``llm`` (2000 MB, priority 1, always on)
and knows ``tts`` (6500 MB, priority 2), which cannot fit beside llm. A
second server has a token: the commands find it in ``--token-file``, else
``$RECONCILER_TOKEN_FILE``, else ``$RECONCILER_TOKEN``, and say how to give
it when they have none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from reconciler.cli.status_cmd import render
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


TOKEN = "cli-test-token"
TOKEN_ENV = ("RECONCILER_TOKEN", "RECONCILER_TOKEN_FILE")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with --token-file: every call but the page needs the token."""
    with Host(tmp_path_factory.mktemp("api-cli-token")) as host:
        host.write(profile(service("llm", host.port(), mb=2000, priority=1, always_on=True)))
        token_file = host.root / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        server = ApiRun(host, "--token-file", str(token_file))
        server.http.headers["Authorization"] = f"Bearer {TOKEN}"
        server.wait_converged()
        try:
            yield server
        finally:
            server.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_ENV}
    env.update(extra)
    return env


def cli(api: ApiRun, *args: str, timeout_s: float = 30, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args, "--url", api.url],
                          capture_output=True, text=True, timeout=timeout_s, env=_env(**env))


@contextmanager
def start_cli(api: ApiRun, *args: str, **env: str) -> Iterator[subprocess.Popen]:
    """The command running in the background; killed (if still running) and its pipes closed afterwards."""
    with subprocess.Popen([sys.executable, "-m", "reconciler", *args, "--url", api.url], env=_env(**env),
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
    state, health, pid, priority, mb, gpu, origin = llm.split()[1:8]
    assert [state, health, priority, mb, gpu, origin] == ["running", "ok", "1", "2000", "0", "started"], llm
    assert int(pid) == next(i["pid"] for i in api.status()["instances"] if i["service"] == "llm")
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
        said = process.stderr.read()
        assert "released lease" in said
        assert "(GPU 0); renewing" in said and "None" not in said  # no model: none named, not "model None"
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


def test_an_expired_lease_shows_as_expired_until_the_next_pass_releases_it(api: ApiRun) -> None:
    """The reconciler releases an expired lease on its next pass (here: at the next resync, 30 s); until
    then the status document shows it with ``state: expired`` and ``remaining_s: 0``; it holds nothing: llm's
    one slot goes to the next request at once."""
    for _ in range(6):  # a pass may release it before we look (a busy machine: more often): then try again
        short = api.lease("llm", holder="short", ttl_s=0.5)
        assert short.status_code == 200, short.text
        time.sleep(0.8)
        active = api.lease("llm", holder="long", ttl_s=300, wait_s=5)
        assert active.status_code == 200, active.text  # the expired lease does not hold llm's only slot
        try:
            status = api.status()
            by_id = {lease["id"]: lease for lease in status["leases"]}
            lease = by_id.get(short.json()["id"])
            if lease is None:
                continue
            assert lease["state"] == "expired" and lease["remaining_s"] == 0, lease
            held = by_id[active.json()["id"]]
            assert held["state"] == "active" and held["remaining_s"] > 250, held
            [llm] = [i for i in status["instances"] if i["service"] == "llm"]
            assert llm["leases"] == 1  # only the active one counts
            lines = render(status).splitlines()
            expired_line = next(line for line in lines if line.startswith(lease["id"]))
            active_line = next(line for line in lines if line.startswith(held["id"]))
            assert expired_line.rstrip().endswith("expired (released on the next pass)"), expired_line
            assert "expired" not in active_line and re.search(r" (5m00|4m5\d)s$", active_line), active_line
            renewed = api.http.post(f"/v1/leases/{lease['id']}/renew", json={"ttl_s": 60})
            assert renewed.status_code == 404 and "expired" in renewed.json()["detail"], renewed.text
            api.http.delete(f"/v1/leases/{lease['id']}")
            return
        finally:
            api.http.delete(f"/v1/leases/{active.json()['id']}")
    pytest.fail("each short lease was released before the status could show it expired")


def test_commands_without_the_token_say_how_to_give_it(secured: ApiRun) -> None:
    for args in (("status",), ("why", "llm"), ("lease", "llm", "--wait", "1")):
        result = cli(secured, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "401" in result.stderr and "--token-file" in result.stderr, result.stderr
        assert "$RECONCILER_TOKEN_FILE" in result.stderr and "Traceback" not in result.stderr
    missing = cli(secured, "status", "--token-file", str(secured.host.root / "no-such-token"))
    assert missing.returncode == 1 and "no-such-token" in missing.stderr and "Traceback" not in missing.stderr
    from_env = cli(secured, "status", RECONCILER_TOKEN_FILE=str(secured.host.root / "nope"))
    assert from_env.returncode == 1 and "$RECONCILER_TOKEN_FILE" in from_env.stderr and "nope" in from_env.stderr


def test_commands_find_the_token_in_a_flag_a_file_or_the_environment(secured: ApiRun) -> None:
    token_file = str(secured.host.root / "token")
    wrong_file = secured.host.root / "wrong-token"
    wrong_file.write_text("not-it\n")
    flag = cli(secured, "status", "--token-file", token_file)
    assert flag.returncode == 0, flag.stderr
    assert any(line.startswith("llm ") for line in flag.stdout.splitlines())
    by_file = cli(secured, "why", "llm", RECONCILER_TOKEN_FILE=token_file)
    assert by_file.returncode == 0 and by_file.stdout.startswith("llm is running"), by_file.stderr
    by_value = cli(secured, "status", "--format", "json", RECONCILER_TOKEN=TOKEN)
    assert by_value.returncode == 0 and json.loads(by_value.stdout)["profile"] == "api", by_value.stderr
    # the flag wins over the environment, the file over the value
    assert cli(secured, "status", "--token-file", str(wrong_file), RECONCILER_TOKEN=TOKEN).returncode == 1
    assert cli(secured, "status", RECONCILER_TOKEN_FILE=str(wrong_file), RECONCILER_TOKEN=TOKEN).returncode == 1
    with start_cli(secured, "lease", "llm", "--holder", "with-token", RECONCILER_TOKEN_FILE=token_file) as process:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), process.stderr.read()
        assert [lease["holder"] for lease in secured.status()["leases"]] == ["with-token"]
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    assert secured.status()["leases"] == []


def test_the_operators_verbs_and_logs_need_the_token(secured: ApiRun) -> None:
    for method, path in (("GET", "/v1/services/llm/logs"), ("POST", "/v1/services/llm/reset"),
                         ("POST", "/v1/services/llm/stop"), ("POST", "/v1/down")):
        assert httpx.request(method, secured.url + path).status_code == 401, path
    assert secured.http.get("/v1/services/llm/logs", params={"tail": 2}).status_code == 200
    without = cli(secured, "reset", "llm")
    assert without.returncode == 1 and "401" in without.stderr and "--token-file" in without.stderr
    logs = cli(secured, "logs", "llm", "-n", "2", RECONCILER_TOKEN=TOKEN)
    assert logs.returncode == 0 and 1 <= len(logs.stdout.splitlines()) <= 2, logs.stderr
    reset = cli(secured, "reset", "llm", RECONCILER_TOKEN=TOKEN)
    assert reset.returncode == 0 and "no failures on record" in reset.stdout, reset.stderr
