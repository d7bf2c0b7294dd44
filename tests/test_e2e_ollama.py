"""A real-Ollama-shaped world: installed models, async unloads, and what answers like an Ollama.

Real ``reconciler serve`` processes, the fake Ollama (which behaves like the
real one where it matters: it answers ``keep_alive: 0`` before the model is
gone) and real HTTP.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store
from tests.api_support import ApiRun
from tests.e2e_support import Host, host, ollama_block, profile_text  # noqa: F401 (fixture)


def test_a_lease_for_a_model_ollama_has_not_pulled_is_refused_at_once(host: Host) -> None:
    port = host.port()
    host.start_foreign("reconciler.testing.fake_ollama", "--port", str(port), "--models", "llama3.2:latest,qwen2.5:7b",
                       sim_mb=1024)
    host.write(profile_text(ollama_block("ollama", port)))
    api = ApiRun(host)
    try:
        api.wait_status(lambda s: any(i["origin"] == "adopted" for i in s["instances"]), "ollama adopted")
        began = time.monotonic()
        refused = api.lease("ollama", model="mistral:7b", wait_s=60)
        waited = time.monotonic() - began
        assert refused.status_code == 503 and waited < 10, (refused.status_code, waited)
        detail = refused.json()["detail"]
        assert "has not pulled model mistral:7b" in detail and "llama3.2:latest, qwen2.5:7b" in detail
        assert "ollama pull mistral:7b" in detail
        granted = api.lease("ollama", model="llama3.2", wait_s=30)  # no tag means :latest, as Ollama reads it
        assert granted.status_code == 200, granted.text
    finally:
        api.close()


def pulling_profile(port: int) -> str:
    block = ollama_block("ollama", port)
    return profile_text(block.replace("    always_on: true\n", "    always_on: true\n    pull: true\n"))


def test_with_pull_true_a_lease_for_a_missing_model_pulls_it_with_progress_then_is_granted(host: Host) -> None:
    port = host.port()
    host.start_foreign("reconciler.testing.fake_ollama", "--port", str(port), "--models", "llama3.2:latest",
                       "--pull-s", "1.0", sim_mb=1024)
    host.write(pulling_profile(port))
    api = ApiRun(host)
    try:
        api.wait_status(lambda s: any(i["origin"] == "adopted" for i in s["instances"]), "ollama adopted")
        began = time.monotonic()
        granted = api.lease("ollama", model="mistral:7b", wait_s=30)
        waited = time.monotonic() - began
        assert granted.status_code == 200, granted.text
        assert granted.json()["model"] == "mistral:7b"
        assert waited >= 1.0  # it waited for the pull (1 s in the fake), not refused at once
        started = api.run.wait_kind("ollama.pull", status="started", model="mistral:7b")
        done = api.run.wait_kind("ollama.pull", status="done", model="mistral:7b")
        assert started["service"] == done["service"] == "ollama" and "pulled model mistral:7b" in done["message"]
        percents = [e["percent"] for e in api.run.seen("ollama.pull", status="progress", model="mistral:7b")
                    if e.get("percent") is not None]
        assert percents[-1] == 100 and percents == sorted(percents) and len(percents) >= 5  # each 10 % step shown
        assert "mistral:7b" in httpx.get(f"http://127.0.0.1:{port}/api/tags", trust_env=False).text
        with open_store(host.state_dir, SYSTEM_CLOCK) as store:  # started and done recorded, progress only shown
            recorded = [e.data.get("status") for e in store.events(limit=1000) if e.kind == "ollama.pull"]
        assert recorded == ["started", "done"]
    finally:
        api.close()


def test_with_pull_true_a_model_the_registry_does_not_know_is_refused_with_its_error(host: Host) -> None:
    port = host.port()
    host.start_foreign("reconciler.testing.fake_ollama", "--port", str(port), "--models", "llama3.2:latest",
                       "--pullable", "qwen2.5:7b", sim_mb=1024)
    host.write(pulling_profile(port))
    api = ApiRun(host)
    try:
        api.wait_status(lambda s: any(i["origin"] == "adopted" for i in s["instances"]), "ollama adopted")
        began = time.monotonic()
        refused = api.lease("ollama", model="nosuch:1b", wait_s=60)
        assert refused.status_code == 503 and time.monotonic() - began < 10, refused.text
        detail = refused.json()["detail"]
        assert "could not pull model nosuch:1b" in detail and "file does not exist" in detail, detail
        failed = api.run.wait_kind("ollama.pull", status="failed", model="nosuch:1b")
        assert "file does not exist" in failed["error"]
    finally:
        api.close()


class _NotOllama(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"<html>welcome</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def impostor(host: Host) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", host.port()), _NotOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_web_server_answering_200_on_api_tags_is_not_taken_for_an_ollama(host: Host, impostor: int) -> None:
    host.write(profile_text(ollama_block("ollama", impostor)))
    api = ApiRun(host)
    try:
        status = api.wait_status(lambda s: s["plan"] is not None, "a first plan")
        assert status["instances"] == []  # not adopted
        pending = " ".join(p["reason"] for p in status["pending"])
        assert f"port {impostor}" in pending  # and nothing started on a port someone else holds
    finally:
        api.close()
