"""Bad input and missing credentials: always a 4xx with a clear message, never a 500 (invariant 7 too).

One ``watch --api`` server with ``--token-file`` (on loopback: a configured
token is enforced wherever the server listens). Malformed, huge, wrongly
typed and out-of-range bodies, unknown ids; then the token: mutating calls
without it (or with a wrong one) are 401 and change nothing, reads stay
open. Listening off loopback without a token is refused at start-up.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from reconciler.api.auth import check_exposure, is_loopback, parse_listen
from reconciler.errors import GuardError
from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with Host(tmp_path_factory.mktemp("api-hardening")) as host:
        host.write(profile(service("llm", host.port(), mb=1000, priority=1, max_concurrent=2)))
        token_file = host.root / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        server = ApiRun(host, "--token-file", str(token_file))
        server.http.headers["Authorization"] = f"Bearer {TOKEN}"
        try:
            yield server
        finally:
            server.close()


def _clear_4xx(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert detail, response.text
    return detail if isinstance(detail, str) else "; ".join(d["msg"] for d in detail)


JSON = {"Content-Type": "application/json"}
BAD_BODIES = {
    "not json": (b"this is not json", 422),
    "truncated": (b'{"service": "llm"', 422),
    "an array": (b"[1, 2, 3]", 422),
    "a string": (b'"llm"', 422),
    "empty": (b"", 422),
    "wrong type": (b'{"service": 5}', 422),
    "ttl as text": (b'{"service": "llm", "ttl_s": "soon"}', 422),
    "negative ttl": (b'{"service": "llm", "ttl_s": -1}', 422),
    "zero ttl": (b'{"service": "llm", "ttl_s": 0}', 422),
    "NaN ttl": (b'{"service": "llm", "ttl_s": NaN}', 422),
    "infinite ttl": (b'{"service": "llm", "ttl_s": 1e400}', 422),
    "huge ttl": (b'{"service": "llm", "ttl_s": 1e300}', 422),
    "huge wait": (b'{"service": "llm", "wait_s": 100000}', 422),
    "negative gpu": (b'{"service": "llm", "gpu": -1}', 422),
    "gpu as float": (b'{"service": "llm", "gpu": 0.5}', 422),
    "misspelt key": (b'{"service": "llm", "ttl": 30}', 422),
    "long name": (b'{"service": "' + b"x" * 1000 + b'"}', 422),
    "null service": (b'{"service": null}', 422),
    "invalid utf-8": (b'{"service": "\xff\xfe"}', 400),
    "deep nesting": (b"[" * 30000 + b"]" * 30000, None),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_lease_bodies_are_4xx_with_a_message(api: ApiRun, name: str) -> None:
    body, status = BAD_BODIES[name]
    response = api.http.post("/v1/leases", content=body, headers=JSON)
    message = _clear_4xx(response)
    if status is not None:
        assert response.status_code == status, response.text
    assert "internal error" not in message


def test_validation_errors_say_where_and_what(api: ApiRun) -> None:
    detail = api.http.post("/v1/leases", json={"service": "llm", "ttl": 30}).json()["detail"]
    assert detail == [{"type": "extra_forbidden", "loc": ["body", "ttl"], "msg": "Extra inputs are not permitted",
                       "input": 30}]
    form = api.http.post("/v1/leases", content=b"service=llm",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422 and "JSON object" in form.json()["detail"][0]["msg"]


def test_huge_bodies_are_refused_before_they_are_read(api: ApiRun) -> None:
    big = b'{"service": "llm", "holder": "' + b"x" * 200_000 + b'"}'
    declared = api.http.post("/v1/leases", content=big, headers=JSON)
    assert declared.status_code == 413 and "over 65536 bytes" in declared.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"service": "llm", "holder": "'
        for _ in range(100):
            yield b"x" * 10_000
        yield b'"}'

    chunked = api.http.post("/v1/leases", content=chunks(), headers=JSON)
    assert chunked.status_code == 413


def test_unknown_ids_and_bad_parameters(api: ApiRun) -> None:
    for response in (
        api.http.delete("/v1/leases/does-not-exist"),
        api.http.post("/v1/leases/does-not-exist/renew", json={"ttl_s": 10}),
        api.http.get("/v1/leases/" + "z" * 5000),
        api.http.delete("/api/leases/does-not-exist"),
        api.http.delete("/api/services/llm/allocations/does-not-exist"),
        api.http.get("/api/services/nope/status"),
    ):
        assert response.status_code == 404, response.text
        _clear_4xx(response)
    assert api.http.post("/v1/leases/x/renew", json={"ttl_s": "later"}).status_code == 422
    assert api.http.get("/v1/events", params={"since": -1}).status_code == 422
    assert api.http.get("/v1/events", params={"since": "abc"}).status_code == 422
    assert api.http.get("/no/such/route").status_code == 404
    assert api.http.put("/v1/leases", json={}).status_code == 405


@pytest.mark.parametrize("body", [
    {"node_id": "local", "gpu_id": 0, "mb": 0, "service": "x"},
    {"node_id": "local", "gpu_id": -1, "mb": 10, "service": "x"},
    {"node_id": "local", "gpu_id": 0, "mb": "lots", "service": "x"},
    {"node_id": "local", "gpu_id": 0, "mb": 10},
    {"node_id": "local", "gpu_id": 0, "mb": 10, "service": "x", "ttl_s": -5},
    {"node_id": "elsewhere", "gpu_id": 0, "mb": 10, "service": "x"},
    {"node_id": "local", "gpu_id": 7, "mb": 10, "service": "x"},
])
def test_bad_vram_lease_requests_are_422(api: ApiRun, body: dict) -> None:
    response = api.http.post("/api/leases", json=body)
    assert response.status_code == 422, response.text
    _clear_4xx(response)


@pytest.mark.parametrize("body", [{"model_candidates": []}, {}, {"model_candidates": "m1"},
                                  {"model_candidates": ["m1"], "ttl_s": 0}])
def test_bad_allocations_are_422(api: ApiRun, body: dict) -> None:
    response = api.http.post("/api/services/llm/allocate", json=body)
    assert response.status_code == 422, response.text
    _clear_4xx(response)


def test_mutating_calls_need_the_token_and_reads_do_not(api: ApiRun) -> None:
    anonymous = httpx.Client(base_url=api.url, timeout=10)
    wrong = httpx.Client(base_url=api.url, timeout=10, headers={"Authorization": "Bearer not-the-token"})
    basic = httpx.Client(base_url=api.url, timeout=10, headers={"Authorization": f"Basic {TOKEN}"})
    try:
        for client in (anonymous, wrong, basic):
            for method, path, body in (
                ("POST", "/v1/leases", {"service": "llm"}),
                ("POST", "/v1/leases/x/renew", {}),
                ("DELETE", "/v1/leases/x", None),
                ("POST", "/api/leases", {"node_id": "local", "gpu_id": 0, "mb": 1, "service": "x"}),
                ("DELETE", "/api/leases/x", None),
                ("POST", "/api/services/llm/allocate", {"model_candidates": ["m"]}),
                ("DELETE", "/api/services/llm/allocations/x", None),
            ):
                response = client.request(method, path, json=body)
                assert response.status_code == 401, (method, path, response.text)
                assert "Bearer" in response.json()["detail"]
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert api.status()["leases"] == [] and api.status()["demands"] == []  # nothing changed
        for path in ("/v1/status", "/v1/leases", "/api/health", "/api/nodes", "/metrics", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        granted = api.lease("llm", holder="with-token")  # the fixture's client sends the token
        assert granted.status_code == 200, granted.text
        assert api.http.delete(f"/v1/leases/{granted.json()['id']}").status_code == 200
    finally:
        for client in (anonymous, wrong, basic):
            client.close()


def test_listening_off_loopback_without_a_token_is_refused(tmp_path) -> None:
    profile_file = tmp_path / "p.yaml"
    profile_file.write_text(profile(service("llm", 1, mb=0)))
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "serve", "--profile", str(profile_file), "--gpu", "sim:8192",
         "--state-dir", str(tmp_path / "state"), "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 without a token" in result.stderr and "--token-file" in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:7700").loopback
    assert parse_listen(":7700").host == "127.0.0.1"
    assert parse_listen("7701").port == 7701
    assert parse_listen("[::1]:7700").loopback and parse_listen("[::1]:7700").url == "http://[::1]:7700"
    assert parse_listen("127.0.0.2:80").loopback and is_loopback("localhost")
    assert not parse_listen("0.0.0.0:7700").loopback and not parse_listen("192.168.1.5:7700").loopback
    for bad in ("nowhere:80", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(GuardError):
            parse_listen(bad)
    with pytest.raises(GuardError, match="without a token"):
        check_exposure(parse_listen("0.0.0.0:7700"), None)
    check_exposure(parse_listen("0.0.0.0:7700"), "token")
    check_exposure(parse_listen("127.0.0.1:7700"), None)
