"""A fake service for demos and end-to-end tests: a real process with an HTTP health endpoint.

    python -m reconciler.testing.service --port P [--health-path /health]
        [--startup-delay S] [--crash-after S] [--exit-code N] [--refuse-health]
        [--ignore-sigterm] [--name NAME] [--host 127.0.0.1]

It listens at once; ``GET <health-path>`` answers 503 until ``--startup-delay``
has passed, then 200 ``{"status": "ok"}`` (always 503 with ``--refuse-health``).
``GET /`` describes the process (name, pid, argv, CUDA_VISIBLE_DEVICES,
RECONCILER_SIM_GPU_MB). After ``--crash-after`` seconds it exits with
``--exit-code`` (default 1). SIGTERM exits 0 at once, unless
``--ignore-sigterm`` (to test SIGKILL escalation). Stdlib only, so it starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reconciler.testing.service")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--health-path", default="/health")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--crash-after", type=float, default=None, metavar="S")
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--refuse-health", action="store_true")
    parser.add_argument("--unhealthy-after", type=float, default=None, metavar="S",
                        help="answer health checks with 503 from S seconds on, while still running")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--name", default="service")
    return parser.parse_args(argv)


def make_handler(args: argparse.Namespace, started: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "reconciler-test-service"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == args.health_path:
                age = time.monotonic() - started
                ready = not args.refuse_health and age >= args.startup_delay
                if args.unhealthy_after is not None and age >= args.unhealthy_after:
                    ready = False
                self._json(200 if ready else 503, {"status": "ok" if ready else "starting"})
            elif path == "/":
                self._json(200, describe(args.name))
            else:
                self._json(404, {"error": f"no route {path}"})

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: tests and demos read stdout for other things

    return Handler


def describe(name: str) -> dict[str, object]:
    return {
        "name": name,
        "pid": os.getpid(),
        "argv": sys.argv,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "sim_gpu_mb": os.environ.get("RECONCILER_SIM_GPU_MB"),
    }


def serve(server: ThreadingHTTPServer, crash_after: float | None, ignore_sigterm: bool) -> bool:
    """Serve until SIGTERM (True) or until ``crash_after`` (False)."""
    stop = threading.Event()
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    terminated = stop.wait(crash_after)
    server.server_close()  # the serving thread is a daemon: exiting ends it at once
    return terminated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args, started))
    print(f"{args.name} listening on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    return 0 if serve(server, args.crash_after, args.ignore_sigterm) else args.exit_code


if __name__ == "__main__":
    sys.exit(main())
