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

import pytest

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
