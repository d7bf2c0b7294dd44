"""Bad input and missing credentials: always a 4xx with a clear message, never a 500 (invariant 7 too).

One ``watch --api`` server with ``--token-file`` (on loopback: a configured
token is enforced wherever the server listens). Malformed, huge, wrongly
typed and out-of-range bodies, lone UTF-16 surrogates in any JSON body (every
route that takes one, as the OpenAPI document lists them), model names that
are paths or carry control characters, event ids past SQLite's integers,
unknown ids; then the token: every call but the dashboard's page, its files,
``/api/health`` and the API's description needs it (an event replay carries
environment values), without it (or with a wrong one) they are 401 and change
nothing. Listening off loopback without a token is refused at start-up. The
server never printed a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

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


MUTATING_CALLS = (
    ("POST", "/v1/leases", {"service": "llm"}),
    ("POST", "/v1/leases/x/renew", {}),
    ("DELETE", "/v1/leases/x", None),
    ("POST", "/api/leases", {"node_id": "local", "gpu_id": 0, "mb": 1, "service": "x"}),
    ("DELETE", "/api/leases/x", None),
    ("POST", "/api/services/llm/allocate", {"model_candidates": ["m"]}),
    ("DELETE", "/api/services/llm/allocations/x", None),
)
# reads that show the host: the event log (events carry environment values), status, plan, leases, metrics
PRIVATE_READS = ("/v1/status", "/v1/plan", "/v1/events?since=0", "/v1/leases", "/v1/leases/x", "/metrics",
                 "/api/nodes", "/api/leases", "/api/services", "/api/services/llm/status")
PUBLIC_READS = ("/", "/static/dashboard.js", "/static/dashboard.css", "/api/health", "/openapi.json", "/docs")


def test_every_call_but_the_page_needs_the_token(api: ApiRun) -> None:
    anonymous = httpx.Client(base_url=api.url, timeout=10)
    wrong = httpx.Client(base_url=api.url, timeout=10, headers={"Authorization": "Bearer not-the-token"})
    basic = httpx.Client(base_url=api.url, timeout=10, headers={"Authorization": f"Basic {TOKEN}"})
    try:
        for client in (anonymous, wrong, basic):
            for method, path, body in MUTATING_CALLS:
                response = client.request(method, path, json=body)
                assert response.status_code == 401, (method, path, response.text)
                assert "Bearer" in response.json()["detail"]
                assert response.headers["www-authenticate"].startswith("Bearer")
            for path in PRIVATE_READS:
                response = client.get(path)  # /v1/events would stream: a 401 ends at once
                assert response.status_code == 401, (path, response.text)
                detail = response.json()["detail"]
                assert "Bearer" in detail and "--token-file" in detail, detail
                assert response.headers["www-authenticate"].startswith("Bearer")
            for path in PUBLIC_READS:
                assert client.get(path).status_code == 200, path
        assert api.status()["leases"] == [] and api.status()["demands"] == []  # nothing changed
        for path in PRIVATE_READS:
            if path.startswith("/v1/events"):
                continue  # a stream: read with the token in test_event_replay_needs_the_token
            response = api.http.get(path)  # the fixture's client sends the token
            assert response.status_code == (404 if path == "/v1/leases/x" else 200), (path, response.text)
        granted = api.lease("llm", holder="with-token")
        assert granted.status_code == 200, granted.text
        assert api.http.delete(f"/v1/leases/{granted.json()['id']}").status_code == 200
    finally:
        for client in (anonymous, wrong, basic):
            client.close()


def sse_ids(client: httpx.Client, seconds: float, **kwargs: object) -> tuple[int, list[int], str]:
    """Read ``GET /v1/events`` for ``seconds``: its status, the ids it sent, and how it ended
    (``open``: still streaming when we stopped; ``ended: …``: the server broke it off)."""
    ids: list[int] = []
    deadline = time.monotonic() + seconds
    with client.stream("GET", "/v1/events", timeout=httpx.Timeout(10, read=0.25), **kwargs) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, ids, "refused"
        try:
            for line in response.iter_lines():
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                if time.monotonic() > deadline:
                    return 200, ids, "open"
            return 200, ids, "ended: the server closed the stream"
        except httpx.ReadTimeout:
            return 200, ids, "open"
        except httpx.HTTPError as exc:
            return 200, ids, f"ended: {type(exc).__name__}: {exc}"


def test_event_replay_needs_the_token(api: ApiRun) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as anonymous:
        status, ids, _ = sse_ids(anonymous, 0.5, params={"since": 0})
        assert status == 401 and ids == []
        status, ids, _ = sse_ids(anonymous, 0.5, headers={"Last-Event-ID": "0"})
        assert status == 401 and ids == []
    status, ids, how = sse_ids(api.http, 1.0, params={"since": 0})
    assert status == 200 and ids and how == "open", (status, ids, how)  # the stored events, replayed


SQLITE_MAX = 2**63 - 1


def test_event_ids_past_sqlite_integers(api: ApiRun) -> None:
    """``?since=`` past SQLite's integers is a 422 naming the range; a ``Last-Event-ID`` that is not an id
    this server could have sent (too large, not digits) is ignored: the stream starts live, no replay."""
    for since in ("99999999999999999999", str(SQLITE_MAX + 1)):
        response = api.http.get("/v1/events", params={"since": since})
        assert response.status_code == 422, response.text
        [problem] = response.json()["detail"]
        assert problem["loc"] == ["query", "since"] and str(SQLITE_MAX) in problem["msg"], problem
    status, ids, how = sse_ids(api.http, 0.5, params={"since": SQLITE_MAX})
    assert (status, ids, how) == (200, [], "open")
    _, replayed, _ = sse_ids(api.http, 0.5, params={"since": 0})
    last = max(replayed)
    for header in (b"99999999999999999999", str(SQLITE_MAX + 1).encode(), b"\xb2", b"-1", b"12abc", b"1 2"):
        status, ids, how = sse_ids(api.http, 0.75, headers={"Last-Event-ID": header})
        assert status == 200 and how == "open", (header, how)
        assert all(i > last for i in ids), (header, ids)  # nothing replayed: only what happened since
    status, ids, how = sse_ids(api.http, 0.5, headers={"Last-Event-ID": str(last - 1)})
    assert (status, how) == (200, "open") and ids[:1] == [last]  # a real id still replays


# ---- lone surrogates -------------------------------------------------------------------------

SURROGATE_BODIES = {  # route → (body, where the 422 must point)
    "lease service": ("/v1/leases", b'{"service": "\\ud800"}', ["body", "service"]),
    "lease holder": ("/v1/leases", b'{"service": "llm", "holder": "x\\udfff"}', ["body", "holder"]),
    "lease model": ("/v1/leases", b'{"service": "llm", "model": "\\udc00abc"}', ["body", "model"]),
    "a key": ("/v1/leases", b'{"service": "llm", "\\ud800": 1}', ["body", "\\ud800"]),
    "renew": ("/v1/leases/x/renew", b'{"ttl_s": "\\ud800"}', ["body", "ttl_s"]),
    "vram lease": ("/api/leases", b'{"node_id": "local", "gpu_id": 0, "mb": 1, "service": "x\\ud800"}',
                   ["body", "service"]),
    "ignored key": ("/api/leases",
                    b'{"node_id": "local", "gpu_id": 0, "mb": 1, "service": "x", "n": ["\\ud800"]}', ["body", "n", 0]),
    "allocate": ("/api/services/llm/allocate", b'{"model_candidates": ["\\ud800"]}',
                 ["body", "model_candidates", 0]),
    "allocate params": ("/api/services/llm/allocate", b'{"model_candidates": ["m"], "params": {"\\udbff": "x"}}',
                        ["body", "params", "\\udbff"]),
}


@pytest.mark.parametrize("name", sorted(SURROGATE_BODIES))
def test_lone_surrogates_are_422_saying_where(api: ApiRun, name: str) -> None:
    path, body, where = SURROGATE_BODIES[name]
    response = api.http.post(path, content=body, headers=JSON)
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == where, problem
    assert "surrogate" in problem["msg"] and "UTF-8" in problem["msg"], problem
    assert api.status()["demands"] == []


def test_every_route_with_a_body_refuses_lone_surrogates(api: ApiRun) -> None:
    """Every operation the OpenAPI document lists with a request body, with a lone surrogate in it."""
    spec = api.http.get("/openapi.json").json()
    routes = [(method.upper(), path) for path, ops in spec["paths"].items()
              for method, op in ops.items() if "requestBody" in op]
    assert len(routes) >= 4, routes  # leases, renew, VRAM leases, allocate
    for method, path in routes:
        url = path.replace("{service}", "llm").replace("{lease_id}", "x").replace("{allocation_id}", "x")
        for body in (b'{"service": "\\ud800", "x": "\\ud800"}', b'["\\udfff"]', b'"\\ud800"'):
            response = api.http.request(method, url, content=body, headers=JSON)
            assert response.status_code == 422, (method, path, body, response.text)
            assert "surrogate" in json.dumps(response.json()), (method, path, response.text)


def test_surrogate_pairs_are_text(api: ApiRun) -> None:
    granted = api.http.post("/v1/leases", content=b'{"service": "llm", "holder": "\\ud83d\\ude00 kiwi"}',
                            headers=JSON)
    assert granted.status_code == 200, granted.text
    assert granted.json()["holder"] == "\U0001F600 kiwi"
    assert api.http.delete(f"/v1/leases/{granted.json()['id']}").status_code == 200


# ---- model names -----------------------------------------------------------------------------

BAD_MODELS = ["../../../../etc/passwd", "/etc/passwd", "models/../../secret", "a\x00b", "-rf", "--help",
              "x" * 201, "llama3 && rm -rf ~", "qwen\n2", "name;id", "$(id)", "org//name", "org/name/", ".", "..",
              "ünïcode", ""]
GOOD_MODELS = ["llama3.2:3b", "qwen2.5-coder:7b-instruct-q4_K_M", "library/llama3:latest",
               "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "Qwen/Qwen2.5-7B-Instruct-AWQ",
               "meta-llama/Llama-3.1-8B-Instruct", "Meta-Llama-3-8B-Instruct.Q4_K_M.gguf", "all-MiniLM-L6-v2",
               "mistralai/Mixtral-8x7B-v0.1", "stable-diffusion-xl+refiner", "x" * 200]


@pytest.mark.parametrize("model", BAD_MODELS, ids=repr)
def test_model_names_that_are_paths_or_commands_are_422(api: ApiRun, model: str) -> None:
    for path, body, loc in (
        ("/v1/leases", {"service": "llm", "model": model, "wait_s": 0}, ["body", "model"]),
        ("/api/services/llm/allocate", {"model_candidates": ["fine:1b", model]}, ["body", "model_candidates", 1]),
    ):
        response = api.http.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        [problem] = response.json()["detail"]
        assert problem["loc"] == loc, problem
        assert "model name" in problem["msg"] and "letters, digits" in problem["msg"], problem
    assert api.status()["demands"] == []


def test_real_model_names_are_accepted(api: ApiRun) -> None:
    for model in GOOD_MODELS:
        response = api.http.post("/v1/leases", json={"service": "llm", "model": model, "wait_s": 0, "ttl_s": 5})
        assert response.status_code != 422, (model, response.text)
        if response.status_code == 200:
            api.http.delete(f"/v1/leases/{response.json()['id']}")


def test_the_server_printed_no_traceback(api: ApiRun) -> None:
    assert "Traceback" not in api.run.stderr(), api.run.stderr()[-3000:]


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
