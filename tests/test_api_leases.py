"""Native leases over real HTTP: cold start then grant, the fast path, 503 with the plan's reason,
404/429, renew/release, expiry, a caller that disconnects, events, status, plan, metrics.

One ``watch --api`` server for the module (real fake services, a simulated
8 GB GPU): llm (3000 MB, priority 1, 2 leases at once, 0.3 s to become
healthy) and tts (6000 MB, priority 2: it does not fit beside llm, and llm is
more important, so a tts lease waits with a reason that names the numbers).
Every test leaves no lease and no demand behind (checked after each).
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with Host(tmp_path_factory.mktemp("api-leases")) as host:
        ports = {name: host.port() for name in ("llm", "tts")}
        host.write(profile(
            service("llm", ports["llm"], mb=3000, priority=1, max_concurrent=2, args="--startup-delay 0.3"),
            service("tts", ports["tts"], mb=6000, priority=2),
        ))
        server = ApiRun(host)
        try:
            yield server
        finally:
            server.close()


@pytest.fixture(autouse=True)
def nothing_left_behind(api: ApiRun):
    yield
    api.release_all()
    api.assert_clean()


def test_cold_lease_starts_the_service_then_grants(api: ApiRun) -> None:
    assert api.status()["instances"] == []  # nothing wanted yet: nothing runs
    began = time.monotonic()
    response = api.lease("llm", holder="kiwi", ttl_s=60, wait_s=10)
    waited = time.monotonic() - began
    assert response.status_code == 200, response.text
    lease = response.json()
    assert lease["service"] == "llm" and lease["holder"] == "kiwi" and lease["gpu"] == 0 and lease["mb"] == 3000
    assert lease["url"].startswith("http://127.0.0.1:") and lease["expires_at"].endswith("Z")
    assert 0.3 <= waited < 5  # it waited for the start (0.3 s to become healthy)
    assert httpx.get(lease["url"] + "/health").status_code == 200  # healthy when granted
    status = api.status()
    assert [i["service"] for i in status["instances"]] == ["llm"]
    assert status["instances"][0]["leases"] == 1 and status["instances"][0]["healthy"]
    assert [(x["id"], x["holder"]) for x in status["leases"]] == [(lease["id"], "kiwi")]
    # the GPU figures are the last observation's: the pass that granted observed before the start
    api.wait_status(lambda s: s["gpus"][0]["reserved_started_mb"] == 3000, "the next pass observed the start")


def test_fast_path_grants_at_once_up_to_max_concurrent(api: ApiRun) -> None:
    api.wait_converged()
    began = time.monotonic()
    first = api.lease("llm", holder="a")
    second = api.lease("llm", holder="b")
    assert first.status_code == second.status_code == 200
    assert time.monotonic() - began < 1.0
    assert first.json()["url"] == second.json()["url"]
    full = api.lease("llm", holder="c", wait_s=0.5)  # 2/2 held: it queues, then gives up with the reason
    assert full.status_code == 503
    assert "2/2 leases held" in full.json()["detail"]
    assert len(api.status()["leases"]) == 2


def test_unreachable_lease_is_503_with_the_plans_reason_and_withdrawn(api: ApiRun) -> None:
    api.wait_converged()
    began = time.monotonic()
    response = api.lease("tts", holder="batch", wait_s=1.0)
    assert response.status_code == 503
    assert time.monotonic() - began >= 1.0
    detail = response.json()["detail"]
    assert "needs 6000 MB on GPU 0" in detail and "llm (priority 1)" in detail, detail
    assert api.status()["demands"] == []  # withdrawn with the answer


def test_a_lease_without_a_holder_is_named_after_the_client_address(api: ApiRun) -> None:
    for body in ({}, {"holder": ""}, {"holder": "  "}):
        response = api.lease("llm", ttl_s=30, **body)
        assert response.status_code == 200, response.text
        holder = response.json()["holder"]
        assert holder.startswith("client 127.0.0.1:") and int(holder.rsplit(":", 1)[1]) > 0, holder
        assert api.http.delete(f"/v1/leases/{response.json()['id']}").status_code == 200


def test_unknown_service_is_404_with_the_known_ones(api: ApiRun) -> None:
    response = api.lease("nope")
    assert response.status_code == 404
    assert "unknown service 'nope'" in response.json()["detail"] and "llm" in response.json()["detail"]


def test_renew_release_and_unknown_ids(api: ApiRun) -> None:
    api.wait_converged()
    lease = api.lease("llm", ttl_s=30).json()
    renewed = api.http.post(f"/v1/leases/{lease['id']}/renew", json={"ttl_s": 600})
    assert renewed.status_code == 200 and renewed.json()["expires_at"] > lease["expires_at"]
    assert api.http.post(f"/v1/leases/{lease['id']}/renew").status_code == 200  # no body: the default TTL
    assert api.http.get(f"/v1/leases/{lease['id']}").json()["id"] == lease["id"]
    released = api.http.delete(f"/v1/leases/{lease['id']}")
    assert released.status_code == 200 and released.json() == {"released": True, "id": lease["id"]}
    for response in (api.http.delete(f"/v1/leases/{lease['id']}"),
                     api.http.post(f"/v1/leases/{lease['id']}/renew", json={}),
                     api.http.get(f"/v1/leases/{lease['id']}"),
                     api.http.delete("/v1/leases/no-such-lease")):
        assert response.status_code == 404 and "no lease" in response.json()["detail"]


def test_expired_lease_is_released_by_the_reconciler(api: ApiRun) -> None:
    api.wait_converged()
    lease = api.lease("llm", ttl_s=0.5).json()
    status = api.wait_status(lambda s: not s["leases"], "the lease expired and was released", 5)
    llm = next(i for i in status["instances"] if i["service"] == "llm")
    assert llm["leases"] == 0 and llm["state"] == "running"  # idle; idle_stop_after_s 0 keeps it
    api.run.wait_kind("lease.expired", lease=lease["id"], timeout_s=5)


def test_full_queue_is_429_and_a_release_lets_the_queue_in(api: ApiRun) -> None:
    api.wait_converged()
    held = [api.lease("llm", holder=f"h{i}").json()["id"] for i in range(2)]
    with ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(api.http.post, "/v1/leases", json={"service": "llm", "holder": f"q{i}", "wait_s": 4})
                   for i in range(8)]
        api.wait_status(lambda s: len(s["demands"]) == 8, "8 demands queued", 5)
        over = api.lease("llm", holder="one-too-many")
        assert over.status_code == 429
        assert "8 requests already wait" in over.json()["detail"] and "4 × max_concurrent 2" in over.json()["detail"]
        for lease_id in held:
            assert api.http.delete(f"/v1/leases/{lease_id}").status_code == 200
        answers = [f.result() for f in waiting]
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 503, 503, 503, 503, 503, 503], [a.text for a in answers]
    assert all("2/2 leases held" in a.json()["detail"] for a in answers if a.status_code == 503)


def _raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_caller_that_disconnects_leaves_no_demand(api: ApiRun) -> None:
    api.wait_converged()
    port = int(api.url.rsplit(":", 1)[1])
    sock = _raw_request(port, {"service": "tts", "holder": "gone", "wait_s": 60})
    api.wait_status(lambda s: [d["holder"] for d in s["demands"]] == ["gone"], "the demand is queued", 5)
    sock.close()
    api.wait_status(lambda s: not s["demands"], "the demand is withdrawn", 5)
    api.run.wait_kind("demand.withdrawn", holder="gone", timeout_s=5)


def test_lease_events_arrive_promptly_on_the_stream(api: ApiRun) -> None:
    api.wait_converged()
    lines: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def read() -> None:
        with (
            httpx.Client(base_url=api.url, timeout=httpx.Timeout(10, read=None)) as client,
            client.stream("GET", "/v1/events") as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                lines.put(line)
                if stop.is_set():
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert lines.get(timeout=5) == ": connected"
    began = time.monotonic()
    lease = api.lease("llm", holder="sse").json()
    seen: dict[str, dict] = {}
    kind = None
    while time.monotonic() - began < 1.0 and "lease.granted" not in seen:
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            continue
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: ") and kind:
            seen[kind] = json.loads(line[len("data: "):])
    assert "lease.granted" in seen, "no lease.granted event within 1 s"
    assert seen["lease.granted"]["lease"] == lease["id"] and seen["lease.granted"]["kind"] == "lease.granted"
    stop.set()
    api.http.delete(f"/v1/leases/{lease['id']}")
    reader.join(5)


def test_events_replay_since_an_id(api: ApiRun) -> None:
    with (
        httpx.Client(base_url=api.url, timeout=httpx.Timeout(10, read=5)) as client,
        client.stream("GET", "/v1/events", params={"since": 0}) as response,
    ):
        ids = []
        for line in response.iter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            if len(ids) >= 5:
                break
    assert ids == sorted(ids) and ids[0] >= 1


def test_status_plan_metrics_and_openapi(api: ApiRun) -> None:
    status = api.wait_converged()
    assert set(status) >= {"node", "profile", "gpus", "services", "instances", "leases", "demands", "pending",
                           "plan", "conditions"}
    assert [s["service"] for s in status["services"]] == ["llm", "tts"]
    assert status["conditions"][0] == {"type": "converged", "ok": True, "service": None, "gpu": None,
                                       "message": "converged: nothing to do"}
    plan = api.http.get("/v1/plan").json()
    assert plan["format_version"] == 1 and plan["profile"] == "api" and plan["actions"] == []
    metrics = api.http.get("/metrics").text
    for name in ("reconciler_gpu_memory_bytes", "reconciler_instances", "reconciler_leases", "reconciler_actions_total",
                 "reconciler_reconcile_duration_seconds", "reconciler_lease_wait_seconds"):
        assert name in metrics, name
    assert 'reconciler_gpu_memory_total_bytes{gpu="0"} 8.589934592e+09' in metrics
    assert 'reconciler_instances{state="running"} 1.0' in metrics
    page = api.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    paths = api.http.get("/openapi.json").json()["paths"]
    assert {"/v1/leases", "/v1/status", "/api/leases", "/api/services/{service}/allocate"} <= set(paths)
