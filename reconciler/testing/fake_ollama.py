"""A fake Ollama server: enough of its API for adoption, attribution and eviction.

    python -m reconciler.testing.fake_ollama --port P [--models a,b] [--vram-mb N]
        [--no-load] [--host 127.0.0.1]

``GET /api/tags`` lists ``--models`` (installed); all of them start loaded
(unless ``--no-load``), each holding ``--vram-mb`` MB, and ``GET /api/ps``
lists the loaded ones with ``size`` and ``size_vram`` in bytes.
``POST /api/generate {"model": m, "keep_alive": 0}`` unloads ``m`` the way a
real Ollama does: it answers at once and unloads *later* — ``--unload-delay``
seconds after the answer, and later still while a request for that model is
in flight (the unload waits for it to end). Any other generate request loads
the model and takes ``--generate-s`` seconds; unknown models answer 404, as
Ollama does. ``GET /`` answers "Ollama is running". SIGTERM exits 0.

To play an adopted Ollama on a simulated GPU, start it with
``RECONCILER_SIM_GPU_MB`` in its environment; that usage is fixed for the life
of the process (the environment is read from outside), unload or not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MIB = 1024 * 1024


class Models:
    """Installed and loaded models, shared by the request threads."""

    def __init__(self, installed: list[str], vram_mb: int, load: bool, unload_delay_s: float = 0.3,
                 generate_s: float = 0.0):
        self.installed = installed
        self.vram_bytes = vram_mb * MIB
        self.loaded: list[str] = list(installed) if load else []
        self.lock = threading.Lock()
        self.unload_delay_s = unload_delay_s
        self.generate_s = generate_s
        self.in_flight: dict[str, int] = {}  # model → requests running on it
        self.idle = threading.Condition(self.lock)

    def tags(self) -> dict[str, object]:
        return {"models": [_model(name, self.vram_bytes) for name in self.installed]}

    def ps(self) -> dict[str, object]:
        expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        with self.lock:
            loaded = list(self.loaded)
        return {
            "models": [
                {**_model(name, self.vram_bytes), "size_vram": self.vram_bytes, "expires_at": expires}
                for name in loaded
            ]
        }

    def generate(self, request: dict[str, object]) -> tuple[int, dict[str, object]]:
        name = str(request.get("model") or "")
        if name not in self.installed:
            return 404, {"error": f"model '{name}' not found"}
        unload = request.get("keep_alive") in (0, "0", "0s", "0m")
        if unload:
            threading.Thread(target=self._unload_later, args=(name,), daemon=True).start()
        else:
            with self.lock:
                if name not in self.loaded:
                    self.loaded.append(name)
                self.in_flight[name] = self.in_flight.get(name, 0) + 1
            try:
                time.sleep(self.generate_s)
            finally:
                with self.lock:
                    self.in_flight[name] -= 1
                    self.idle.notify_all()
        now = datetime.now(UTC).isoformat()
        reason = "unload" if unload else "load"
        return 200, {"model": name, "created_at": now, "response": "", "done": True, "done_reason": reason}


    def _unload_later(self, name: str) -> None:
        """Unload ``name`` after the delay, once no request runs on it (as Ollama's scheduler does)."""
        time.sleep(self.unload_delay_s)
        with self.lock:
            while self.in_flight.get(name):
                self.idle.wait()
            if name in self.loaded:
                self.loaded.remove(name)


def _model(name: str, size: int) -> dict[str, object]:
    return {"name": name, "model": name, "size": size, "digest": "0" * 64, "details": {"format": "gguf"}}


def make_handler(models: Models) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fake-ollama"

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/api/tags":
                self._json(200, models.tags())
            elif path == "/api/ps":
                self._json(200, models.ps())
            elif path == "/":
                self._text(200, "Ollama is running")
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._json(400, {"error": "invalid JSON"})
            if self.path.split("?", 1)[0] != "/api/generate" or not isinstance(request, dict):
                return self._json(404, {"error": "not found"})
            self._json(*models.generate(request))

        def _json(self, status: int, body: object) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _text(self, status: int, body: str) -> None:
            self._send(status, body.encode(), "text/plain")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.testing.fake_ollama")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--models", default="llama3.2:3b", help="comma-separated model names")
    parser.add_argument("--vram-mb", type=int, default=1024, help="VRAM each loaded model holds")
    parser.add_argument("--no-load", action="store_true", help="start with no model loaded")
    parser.add_argument("--unload-delay", type=float, default=0.3, metavar="S",
                        help="an unload (keep_alive 0) happens this long after its answer (default 0.3)")
    parser.add_argument("--generate-s", type=float, default=0.0, metavar="S", help="how long a generate takes")
    args = parser.parse_args(argv)
    models = Models([m for m in args.models.split(",") if m], args.vram_mb, not args.no_load,
                    args.unload_delay, args.generate_s)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(models))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"fake ollama listening on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    stop.wait()
    server.server_close()  # the serving thread is a daemon: exiting ends it at once
    return 0


if __name__ == "__main__":
    sys.exit(main())
