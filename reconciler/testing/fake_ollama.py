"""A fake Ollama server: enough of its API for adoption, attribution and eviction.

    python -m reconciler.testing.fake_ollama --port P [--models a,b] [--vram-mb N]
        [--no-load] [--host 127.0.0.1] [--pullable a,b] [--pull-s S]

``GET /api/tags`` lists ``--models`` (installed; ``POST /api/show`` describes
each, 404 for others); all of them start loaded
(unless ``--no-load``), each holding ``--vram-mb`` MB, and ``GET /api/ps``
lists the loaded ones with ``size`` and ``size_vram`` in bytes.
``POST /api/generate {"model": m, "keep_alive": 0}`` unloads ``m`` the way a
real Ollama does: it answers at once and unloads *later* — ``--unload-delay``
seconds after the answer, and later still while a request for that model is
in flight (the unload waits for it to end); with ``--unload-delay 0`` it is
unloaded before the answer when no request runs on it (a test that wants the
unload settled). Any other generate request loads
the model and takes ``--generate-s`` seconds; unknown models answer 404, as
Ollama does. ``GET /`` answers "Ollama is running". SIGTERM exits 0.

``POST /api/pull {"model": m}`` streams the progress lines a real Ollama
sends — ``pulling manifest``, ``pulling <digest>`` with ``total`` and a
growing ``completed`` (five steps over ``--pull-s`` seconds), ``verifying
sha256 digest``, ``writing manifest``, ``success`` — and then lists ``m``
in ``/api/tags`` (a name without a tag as ``:latest``); a model not in
``--pullable`` (when given) gets ``{"error": "pull model manifest: file
does not exist"}`` after the manifest line, as Ollama answers for a name
its registry does not know.

For the model gateway it also answers prompts, deterministically (the
reply of :func:`reconciler.testing.fake_openai.reply`: ``"<model>:"``, ``" w1"``…,
``options.num_predict`` pieces, default 8): ``POST /api/generate`` with a
``prompt`` and ``POST /api/chat`` stream NDJSON — one ``{"response"|"message",
"done": false}`` line per piece, every ``--chunk-delay`` seconds, then a
``"done": true`` line with the counts — or, with ``"stream": false``, one
JSON answer; ``POST /api/embed`` answers ``embeddings``. ``GET /stats``
says how many prompts it answered, with the last request's body.

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

from reconciler.testing.fake_openai import embedding, reply

MIB = 1024 * 1024


class Models:
    """Installed and loaded models, shared by the request threads."""

    def __init__(self, installed: list[str], vram_mb: int, load: bool, unload_delay_s: float = 0.3,
                 generate_s: float = 0.0, chunk_delay_s: float = 0.0, pullable: list[str] | None = None,
                 pull_s: float = 0.5):
        self.installed = installed
        self.pullable = pullable  # None: any name can be pulled
        self.pull_s = pull_s
        self.vram_bytes = vram_mb * MIB
        self.loaded: list[str] = list(installed) if load else []
        self.lock = threading.Lock()
        self.unload_delay_s = unload_delay_s
        self.generate_s = generate_s
        self.in_flight: dict[str, int] = {}  # model → requests running on it
        self.idle = threading.Condition(self.lock)
        self.chunk_delay_s = chunk_delay_s
        self.prompts = 0  # prompts answered (chat, generate with a prompt, embed)
        self.last: dict[str, object] = {}

    def answer(self, request: dict[str, object], kind: str) -> tuple[int, list[dict[str, object]]]:
        """A prompt's answer as the lines Ollama would send (``kind``: chat or generate)."""
        name = str(request.get("model") or "")
        if name not in self.installed and f"{name}:latest" not in self.installed:
            return 404, [{"error": f"model '{name}' not found"}]
        canonical = name if name in self.installed else f"{name}:latest"
        with self.lock:
            self.prompts += 1
            self.last = request
            if canonical not in self.loaded:
                self.loaded.append(canonical)
        options = request.get("options") if isinstance(request.get("options"), dict) else {}
        assert isinstance(options, dict)
        pieces = reply(name, int(options.get("num_predict") or 8))
        field = "message" if kind == "chat" else "response"
        lines: list[dict[str, object]] = []
        for piece in pieces:
            body: object = {"role": "assistant", "content": piece} if kind == "chat" else piece
            lines.append({"model": name, "created_at": datetime.now(UTC).isoformat(), field: body, "done": False})
        final_body: object = {"role": "assistant", "content": ""} if kind == "chat" else ""
        lines.append({"model": name, "created_at": datetime.now(UTC).isoformat(), field: final_body, "done": True,
                      "done_reason": "length", "total_duration": 1000, "load_duration": 10,
                      "prompt_eval_count": 3, "prompt_eval_duration": 100, "eval_count": len(pieces),
                      "eval_duration": 800})
        return 200, lines

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
        settled = False
        if unload and self.unload_delay_s <= 0:  # --unload-delay 0: before the answer, unless a request runs on it
            with self.lock:
                if not self.in_flight.get(name):
                    settled = True
                    if name in self.loaded:
                        self.loaded.remove(name)
        if unload:
            if not settled:
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


    def pull(self, name: str) -> list[dict[str, object] | float]:
        """The progress lines of a pull (floats between them: seconds to wait); installs ``name`` at the end."""
        canonical = name if ":" in name else f"{name}:latest"
        lines: list[dict[str, object] | float] = [{"status": "pulling manifest"}]
        if self.pullable is not None and name not in self.pullable and canonical not in self.pullable:
            return [*lines, {"error": "pull model manifest: file does not exist"}]
        digest = "sha256:" + "ab" * 32
        for step in range(6):
            if step:
                lines.append(self.pull_s / 5)
            lines.append({"status": f"pulling {digest[7:19]}", "digest": digest, "total": self.vram_bytes,
                          "completed": self.vram_bytes * step // 5})
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        return lines

    def installed_now(self, name: str) -> None:
        canonical = name if ":" in name else f"{name}:latest"
        with self.lock:
            if canonical not in self.installed:
                self.installed.append(canonical)

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
            elif path == "/stats":
                with models.lock:
                    self._json(200, {"prompts": models.prompts, "last": models.last, "loaded": list(models.loaded)})
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
            path = self.path.split("?", 1)[0]
            if isinstance(request, dict) and path == "/api/pull":
                return self._pull(str(request.get("model") or request.get("name") or ""))
            if isinstance(request, dict) and path == "/api/show":
                name = str(request.get("model") or request.get("name") or "")
                if name not in models.installed:
                    return self._json(404, {"error": f"model '{name}' not found"})
                return self._json(200, {"modelfile": f"FROM {name}", "parameters": "", "template": "{{ .Prompt }}",
                                        "details": {"format": "gguf", "family": "fake"},
                                        "model_info": {"general.architecture": "fake"},
                                        "capabilities": ["completion"]})
            if not isinstance(request, dict) or path not in ("/api/generate", "/api/chat", "/api/embed"):
                return self._json(404, {"error": "not found"})
            if path == "/api/embed":
                return self._embed(request)
            if path == "/api/generate" and not request.get("prompt"):  # load or unload, as before
                return self._json(*models.generate(request))
            status, lines = models.answer(request, "chat" if path == "/api/chat" else "generate")
            if status != 200 or request.get("stream") is False:
                if status == 200:
                    text = "".join(str(line.get("response", "")) if path == "/api/generate" else
                                   str(line["message"]["content"]) for line in lines  # type: ignore[index]
                                   if not line["done"])
                    final = dict(lines[-1])
                    final["response" if path == "/api/generate" else "message"] = (
                        text if path == "/api/generate" else {"role": "assistant", "content": text})
                    return self._json(200, final)
                return self._json(status, lines[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            for index, line in enumerate(lines):
                if index and models.chunk_delay_s:
                    time.sleep(models.chunk_delay_s)
                try:
                    self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()
                except OSError:
                    return None  # the client went away
            return None

        def _pull(self, name: str) -> None:
            if not name:
                return self._json(400, {"error": "model is required"})
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            failed = False
            for line in models.pull(name):
                if isinstance(line, float):
                    time.sleep(line)
                    continue
                failed = failed or "error" in line
                try:
                    self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()
                except OSError:
                    return None  # the client went away: the pull stops, nothing installed
            if not failed:
                models.installed_now(name)
            return None

        def _embed(self, request: dict[str, object]) -> None:
            name = str(request.get("model") or "")
            if name not in models.installed and f"{name}:latest" not in models.installed:
                return self._json(404, {"error": f"model '{name}' not found"})
            inputs = request.get("input")
            texts = [inputs] if isinstance(inputs, str) else inputs if isinstance(inputs, list) else []
            with models.lock:
                models.prompts += 1
                models.last = request
            return self._json(200, {"model": name, "embeddings": [embedding(str(t), 8) for t in texts],
                                    "total_duration": 1000, "load_duration": 10, "prompt_eval_count": len(texts)})

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
                        help="an unload (keep_alive 0) happens this long after its answer (default 0.3; 0: before "
                             "it, when no request runs on the model)")
    parser.add_argument("--generate-s", type=float, default=0.0, metavar="S", help="how long a generate takes")
    parser.add_argument("--chunk-delay", type=float, default=0.0, metavar="S", help="between streamed lines")
    parser.add_argument("--pullable", default=None, help="comma-separated models /api/pull finds (default: any)")
    parser.add_argument("--pull-s", type=float, default=0.5, metavar="S", help="how long a pull takes (default 0.5)")
    args = parser.parse_args(argv)
    pullable = [m for m in args.pullable.split(",") if m] if args.pullable is not None else None
    models = Models([m for m in args.models.split(",") if m], args.vram_mb, not args.no_load,
                    args.unload_delay, args.generate_s, args.chunk_delay, pullable, args.pull_s)
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
