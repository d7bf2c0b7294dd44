"""cf-orch compatible routes over real HTTP: the shapes and codes cf-orch clients rely on, backed by
the real reconciler — a VRAM lease really blocks a competing start, an allocation really starts one.

One ``watch --api`` server (simulated 8 GB GPU): ``vllm`` (3000 MB, its
launch takes ``{model}``, two leases at once) and ``small`` (1000 MB).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host

LEASE_KEYS = {"lease_id", "node_id", "gpu_id", "mb_granted", "holder_service", "priority", "expires_at"}
ALLOCATION_KEYS = {"allocation_id", "service", "node_id", "gpu_id", "model", "url", "started", "warm"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with Host(tmp_path_factory.mktemp("api-compat")) as host:
        host.write(profile(
            service("vllm", host.port(), mb=3000, priority=2, max_concurrent=2)
            .replace("--name vllm ", "--name vllm-{model} "),  # its launch takes the model
            service("small", host.port(), mb=1000, priority=3),
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


def vram(api: ApiRun, mb: int, **extra) -> httpx.Response:
    return api.http.post("/api/leases", json={"node_id": "local", "gpu_id": 0, "mb": mb, "service": "kiwi", **extra})


def allocate(api: ApiRun, service: str, *models: str, caller: str = "app") -> httpx.Response:
    return api.http.post(f"/api/services/{service}/allocate", json={"model_candidates": list(models), "caller": caller})


def test_health_and_nodes(api: ApiRun) -> None:
    assert api.http.get("/api/health").json() == {"status": "ok"}
    api.wait_converged()
    nodes = api.http.get("/api/nodes").json()["nodes"]
    assert len(nodes) == 1 and nodes[0]["node_id"] == "local" and nodes[0]["agent_url"] == api.url
    assert nodes[0]["last_heartbeat"] > time.time() - 60
    gpu = nodes[0]["gpus"][0]
    assert set(gpu) == {"gpu_id", "name", "vram_total_mb", "vram_used_mb", "vram_free_mb"}
    assert gpu["gpu_id"] == 0 and gpu["vram_total_mb"] == 8192 and gpu["vram_free_mb"] <= 8192


def test_vram_lease_shapes_list_and_release(api: ApiRun) -> None:
    api.wait_converged()
    granted = vram(api, 1000, priority=1)
    assert granted.status_code == 200, granted.text
    lease = granted.json()["lease"]
    assert set(lease) == LEASE_KEYS
    assert (lease["node_id"], lease["gpu_id"], lease["mb_granted"], lease["holder_service"], lease["priority"],
            lease["expires_at"]) == ("local", 0, 1000, "kiwi", 1, 0.0)
    timed = vram(api, 500, ttl_s=30).json()["lease"]
    assert time.time() + 25 < timed["expires_at"] < time.time() + 35 and timed["priority"] == 2
    listed = api.http.get("/api/leases").json()["leases"]
    assert sorted(x["lease_id"] for x in listed) == sorted([lease["lease_id"], timed["lease_id"]])
    status = api.status()
    assert status["gpus"][0]["leased_mb"] == 1500
    for lease_id in (lease["lease_id"], timed["lease_id"]):
        assert api.http.delete(f"/api/leases/{lease_id}").json() == {"released": True, "lease_id": lease_id}
        gone = api.http.delete(f"/api/leases/{lease_id}")
        assert gone.status_code == 404 and gone.json() == {"detail": f"Lease {lease_id!r} not found"}
    assert api.http.get("/api/leases").json() == {"leases": []}


def test_insufficient_vram_and_unknown_node(api: ApiRun) -> None:
    api.wait_converged()
    refused = vram(api, 9000)
    assert refused.status_code == 503 and refused.json()["detail"].startswith("Insufficient VRAM")
    assert "9000 MB requested" in refused.json()["detail"]
    unknown = api.http.post("/api/leases", json={"node_id": "elsewhere", "gpu_id": 0, "mb": 1, "service": "x"})
    assert unknown.status_code == 422 and "Unknown node_id 'elsewhere'" in unknown.json()["detail"]


def test_a_vram_lease_blocks_a_competing_start_until_released(api: ApiRun) -> None:
    api.wait_converged()
    held = vram(api, 6000).json()["lease"]
    began = time.monotonic()
    blocked = allocate(api, "vllm", "m1")
    assert blocked.status_code == 503
    assert time.monotonic() - began < 5  # no capacity: said at once, as cf-orch does
    assert "needs 3000 MB on GPU 0, 2192 free" in blocked.json()["detail"], blocked.text
    native = api.lease("vllm", model="m1", wait_s=0.5)
    assert native.status_code == 503 and "2192 free" in native.json()["detail"]
    assert vram(api, 3000).status_code == 503  # and it counts against other VRAM leases
    status = api.status()
    assert status["instances"] == [] and status["demands"] == []

    api.http.delete(f"/api/leases/{held['lease_id']}")
    granted = allocate(api, "vllm", "m1", caller="kiwi")
    assert granted.status_code == 200, granted.text
    allocation = granted.json()
    assert set(allocation) == ALLOCATION_KEYS
    assert (allocation["service"], allocation["node_id"], allocation["gpu_id"], allocation["model"],
            allocation["started"], allocation["warm"]) == ("vllm", "local", 0, "m1", True, False)
    assert httpx.get(allocation["url"] + "/health").status_code == 200
    described = httpx.get(allocation["url"] + "/").json()
    assert described["name"] == "vllm-m1"  # started with the candidate as its {model}
    gpu = api.status()["gpus"][0]
    assert gpu["reserved_started_mb"] == 3000
    assert gpu["reserved_started_mb"] + gpu["adopted_mb"] + gpu["leased_mb"] + gpu["foreign_mb"] <= gpu["total_mb"]


def test_allocate_warm_and_candidates_falling_through(api: ApiRun) -> None:
    api.wait_status(lambda s: any(i["service"] == "vllm" and i["model"] == "m1" for i in s["instances"]),
                    "vllm serving m1")
    api.wait_converged()
    first = allocate(api, "vllm", "m1").json()
    assert (first["model"], first["warm"], first["started"]) == ("m1", True, False)
    # busy with m1: m2 would need a restart, which a busy instance never gets; m1 has room
    second = allocate(api, "vllm", "m2", "m1")
    assert second.status_code == 200, second.text
    assert (second.json()["model"], second.json()["warm"]) == ("m1", True)
    full = allocate(api, "vllm", "m1")  # 2/2 held
    assert full.status_code == 503
    assert full.json()["detail"].startswith("All model candidates exhausted for 'vllm'")
    assert "2/2 leases held" in full.json()["detail"]
    api.release_all()
    # idle now: a request for another model restarts it with that model
    switched = allocate(api, "vllm", "m2")
    assert switched.status_code == 200, switched.text
    assert (switched.json()["model"], switched.json()["warm"]) == ("m2", False)
    assert httpx.get(switched.json()["url"] + "/").json()["name"] == "vllm-m2"


def test_release_allocations(api: ApiRun) -> None:
    api.wait_converged()
    allocation = allocate(api, "vllm", "m2").json()
    other = api.http.delete(f"/api/services/small/allocations/{allocation['allocation_id']}")
    assert other.status_code == 404 and "not found for service 'small'" in other.json()["detail"]
    released = api.http.delete(f"/api/services/vllm/allocations/{allocation['allocation_id']}")
    assert released.json() == {"released": True, "allocation_id": allocation["allocation_id"]}
    assert api.http.delete(f"/api/services/vllm/allocations/{allocation['allocation_id']}").status_code == 404
    held = vram(api, 100).json()["lease"]
    assert api.http.delete(f"/api/services/vllm/allocations/{held['lease_id']}").status_code == 404
    unknown = allocate(api, "nope", "m1")
    assert unknown.status_code == 422 and "Unknown service 'nope'" in unknown.json()["detail"]


def test_services_and_service_status(api: ApiRun) -> None:
    api.wait_converged()
    allocation = allocate(api, "vllm", "m2", caller="kiwi").json()
    listed = api.http.get("/api/services").json()["services"]
    vllm = next(s for s in listed if s["service"] == "vllm")
    assert vllm == {"service": "vllm", "node_id": "local", "gpu_id": 0, "state": "running", "model": "m2",
                    "url": allocation["url"]}
    status = api.http.get("/api/services/vllm/status").json()
    assert status["service"] == "vllm"
    assert [i["state"] for i in status["instances"]] == ["running"]
    assert status["instances"][0]["idle_since"] is None  # it holds an allocation
    [held] = status["allocations"]
    assert (held["allocation_id"], held["caller"], held["model"], held["url"]) == (
        allocation["allocation_id"], "kiwi", "m2", allocation["url"])
    assert held["expires_at"] > time.time() + 3000  # ttl_s 3600 by default
    empty = api.http.get("/api/services/small/status").json()
    assert empty == {"service": "small", "instances": [], "allocations": []}
