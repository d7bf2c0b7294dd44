"""The fast lane (reconciler.api.fastlane) answers exactly as the framework does.

A request with ``Content-Type: application/json`` that validates is answered by the fast
lane; the same request sent as ``application/json; charset=utf-8`` goes through FastAPI's
routing. Over real HTTP to one server, each pair of answers must be the same: status,
keys, values (less the ids and times a new lease gets), errors word for word.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from reconciler.api.fastlane import ROUTES, FastLane
from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host

LANE = {"content-type": "application/json"}
FRAMEWORK = {"content-type": "application/json; charset=utf-8"}
VOLATILE = {"id", "lease_id", "expires_at", "holder"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with Host(tmp_path_factory.mktemp("api-fastlane")) as host:
        host.write(profile(service("warm", host.port(), mb=1000, priority=2, max_concurrent=4, always_on=True)))
        server = ApiRun(host)
        try:
            server.wait_converged()
            yield server
        finally:
            server.close()


def post(api: ApiRun, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return api.http.post(path, content=json.dumps(body).encode(), headers=headers)


def same(a: httpx.Response, b: httpx.Response) -> None:
    assert a.status_code == b.status_code, (a.text, b.text)
    assert a.headers["content-type"] == b.headers["content-type"]
    left, right = a.json(), b.json()
    if isinstance(left, dict) and isinstance(left.get("lease"), dict):
        left, right = left["lease"], right["lease"]
    if isinstance(left, dict):
        assert set(left) == set(right)
        left = {k: v for k, v in left.items() if k not in VOLATILE}
        right = {k: v for k, v in right.items() if k not in VOLATILE}
    assert left == right


def test_the_four_routes_answer_as_the_framework_does(api: ApiRun) -> None:
    bodies = [
        ("/v1/leases", {"service": "warm", "holder": "h", "ttl_s": 60}),
        ("/api/leases", {"node_id": "local", "gpu_id": 0, "mb": 10, "service": "kiwi", "priority": 3,
                         "ttl_s": 60, "extra": "ignored"}),
    ]
    for path, body in bodies:
        lane, framework = post(api, path, body, LANE), post(api, path, body, FRAMEWORK)
        assert lane.status_code == 200, lane.text
        same(lane, framework)
        for answer in (lane, framework):
            doc = answer.json()
            lease_id = doc["lease"]["lease_id"] if "lease" in doc else doc["id"]
            released = api.http.delete(f"{path}/{lease_id}")
            assert released.status_code == 200, released.text
        again_lane = api.http.delete(f"{path}/{lease_id}")  # gone: the route's own 404 through the lane
        assert again_lane.status_code == 404 and ("not found" in again_lane.text or "no lease" in again_lane.text)


@pytest.mark.parametrize("path, body", [
    ("/v1/leases", {"service": "nope", "holder": "h"}),  # the route's 404 (unknown service)
    ("/v1/leases", {"service": "warm", "ttl_s": -1}),  # a 422 the framework words (handed over)
    ("/v1/leases", {"service": "warm", "holder": "\ud800"}),  # a lone surrogate: the framework's 422
    ("/api/leases", {"node_id": "other", "gpu_id": 0, "mb": 10, "service": "kiwi"}),  # the route's 422
    ("/api/leases", {"node_id": "local", "gpu_id": 7, "mb": 10, "service": "kiwi"}),  # no such GPU
    ("/api/leases", {"node_id": "local", "gpu_id": 0, "mb": 999999, "service": "kiwi"}),  # does not fit: 503
    ("/api/leases", [1, 2]),  # not an object
])
def test_errors_are_the_same_word_for_word(api: ApiRun, path: str, body: Any) -> None:
    lane, framework = post(api, path, body, LANE), post(api, path, body, FRAMEWORK)
    assert lane.status_code >= 400
    assert (lane.status_code, lane.json()) == (framework.status_code, framework.json())


def test_a_body_that_is_not_json_is_the_frameworks_answer(api: ApiRun) -> None:
    lane = api.http.post("/v1/leases", content=b"{not json", headers=LANE)
    framework = api.http.post("/v1/leases", content=b"{not json", headers=FRAMEWORK)
    assert lane.status_code == framework.status_code == 422
    assert lane.json() == framework.json()


def test_only_the_four_routes_take_the_lane() -> None:
    lane = FastLane(app=None, context=None)  # type: ignore[arg-type]  # only its routing is read here

    def route(method: str, path: str) -> Any:
        return lane._route({"type": "http", "method": method, "path": path})

    assert set(ROUTES) == {("POST", "/v1/leases"), ("DELETE", "/v1/leases/"), ("POST", "/api/leases"),
                           ("DELETE", "/api/leases/")}
    assert route("POST", "/v1/leases") is not None and route("DELETE", "/api/leases/abc") is not None
    assert route("DELETE", "/v1/leases/abc")[2] == "abc"
    for method, path in [("GET", "/v1/leases"), ("DELETE", "/v1/leases/"), ("POST", "/v1/leases/abc/renew"),
                         ("GET", "/v1/leases/abc"), ("DELETE", "/v1/leases/a/b"), ("POST", "/v1/leases/"),
                         ("POST", "/api/leases/abc"), ("DELETE", "/api/services/x/allocations/y")]:
        assert route(method, path) is None, (method, path)
