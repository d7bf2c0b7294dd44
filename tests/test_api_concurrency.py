"""200 concurrent lease requests against services that fit only partly (invariant 4, over real HTTP).

A simulated 8 GB GPU; ``a`` (3000 MB, 3 leases at once), ``b`` (3000 MB, one
lease), ``c`` (4000 MB, least important: it fits only when ``a`` or ``b`` is
not running), and cf-orch VRAM leases of 1500 MB. 200 requests, 50 in flight
at a time, each holding what it got for a moment and releasing it. All the
while a watcher reads the status: never more leases on a service than it
may hold, never more reserved on the GPU than it has. Every request is
answered — granted, 503 with a reason, or 429 — and afterwards nothing is
left: no lease, no demand.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host

REQUESTS = 200
IN_FLIGHT = 50
CAPACITY = {"a": 3, "b": 1, "c": 1}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with Host(tmp_path_factory.mktemp("api-concurrency")) as host:
        host.write(profile(
            service("a", host.port(), mb=3000, priority=1, max_concurrent=3, args="--startup-delay 0.2"),
            service("b", host.port(), mb=3000, priority=2, args="--startup-delay 0.1"),
            service("c", host.port(), mb=4000, priority=3),
        ))
        server = ApiRun(host)
        try:
            yield server
        finally:
            server.close()


def check_invariants(status: dict, violations: list[str]) -> None:
    held: dict[str, int] = {}
    for lease in status["leases"]:
        if lease["kind"] == "service" and (lease["remaining_s"] or 0) > 0:
            held[lease["service"]] = held.get(lease["service"], 0) + 1
    for name, n in held.items():
        if n > CAPACITY[name]:
            violations.append(f"{name} holds {n} leases, more than {CAPACITY[name]}: {status['leases']}")
    for gpu in status["gpus"]:
        reserved = gpu["reserved_started_mb"] + gpu["adopted_mb"] + gpu["leased_mb"] + gpu["foreign_mb"]
        if reserved > gpu["total_mb"]:
            violations.append(f"GPU {gpu['index']}: {reserved} MB reserved of {gpu['total_mb']}: {gpu}")


async def one_request(client: httpx.AsyncClient, i: int, limit: asyncio.Semaphore) -> tuple[str, httpx.Response]:
    kind = ("a", "b", "c", "vram")[i % 4]
    async with limit:
        if kind == "vram":
            response = await client.post("/api/leases", json={
                "node_id": "local", "gpu_id": 0, "mb": 1500, "service": f"app{i}", "ttl_s": 60})
            lease_id = response.json()["lease"]["lease_id"] if response.status_code == 200 else None
        else:
            response = await client.post("/v1/leases", json={
                "service": kind, "holder": f"client{i}", "ttl_s": 60, "wait_s": 2})
            lease_id = response.json()["id"] if response.status_code == 200 else None
        if lease_id is not None:
            await asyncio.sleep(random.uniform(0, 0.3))
            released = await client.delete(f"/v1/leases/{lease_id}")
            assert released.status_code in (200, 404), released.text  # 404: evicted for a more important one
    return kind, response


async def storm(url: str) -> tuple[list[tuple[str, httpx.Response]], list[str], int]:
    violations: list[str] = []
    checks = 0
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=IN_FLIGHT + 5, max_keepalive_connections=IN_FLIGHT + 5)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def watch() -> None:
            nonlocal checks
            while not done.is_set():
                check_invariants((await client.get("/v1/status")).json(), violations)
                checks += 1
                await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch())
        limit = asyncio.Semaphore(IN_FLIGHT)
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(one_request(client, i, limit) for i in range(REQUESTS))), 60)
        finally:
            done.set()
            await watcher
    return answers, violations, checks


def test_200_concurrent_requests_keep_the_invariants_and_leak_nothing(api: ApiRun) -> None:
    random.seed(4)
    api.wait_converged()
    answers, violations, checks = asyncio.run(storm(api.url))
    assert not violations, violations[:3]
    assert checks > 10
    assert len(answers) == REQUESTS
    codes: dict[int, int] = {}
    for kind, response in answers:
        codes[response.status_code] = codes.get(response.status_code, 0) + 1
        assert response.status_code in (200, 429, 503), (kind, response.status_code, response.text)
        if response.status_code != 200:
            detail = response.json()["detail"]
            assert isinstance(detail, str) and len(detail) > 10, detail
    assert codes.get(200, 0) >= 20, codes  # the queue moves: many are granted as others release
    api.release_all()
    api.assert_clean()
    status = api.status()
    check_invariants(status, violations)
    assert not violations
