"""A server killed with requests in flight: the next one keeps the leases (invariant 5) and withdraws
the demands whose callers died with the old process (nothing waits forever for nobody)."""

from __future__ import annotations

import json
import socket

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, host  # noqa: F401


def test_restart_keeps_leases_and_drops_orphaned_demands(host: Host) -> None:
    host.write(profile(service("llm", host.port(), mb=3000, priority=1, always_on=True),
                       service("tts", host.port(), mb=6000, priority=2)))
    first = ApiRun(host)
    try:
        pid = first.wait_converged()["instances"][0]["pid"]
        lease = first.lease("llm", holder="survivor", ttl_s=600).json()
        body = json.dumps({"service": "tts", "holder": "orphan", "wait_s": 60}).encode()
        port = int(first.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            first.wait_status(lambda s: [d["holder"] for d in s["demands"]] == ["orphan"], "the demand waits")
            first.run.kill()  # SIGKILL: no clean-up at all
    finally:
        first.close()
    second = ApiRun(host)
    try:
        status = second.wait_converged()
        assert status["demands"] == []
        assert [(x["id"], x["holder"]) for x in status["leases"]] == [(lease["id"], "survivor")]
        assert [(i["service"], i["pid"]) for i in status["instances"]] == [("llm", pid)]  # found again
        assert second.run.seen("demand.withdrawn", holder="orphan")  # announced before api.started
        assert second.http.delete(f"/v1/leases/{lease['id']}").status_code == 200
    finally:
        second.close()
