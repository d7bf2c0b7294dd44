"""A small etcd v3 client over etcd's JSON gateway (grpc-gateway), with httpx.

Why not a third-party client. The maintained Python etcd clients either speak
gRPC (``etcd3``: unmaintained since 2020, pins an old ``protobuf`` and
``grpcio``, both large native wheels) or wrap the same JSON gateway we use
here (``aetcd``, ``etcd-client``…). What the reconciler needs is eight calls —
range, put, delete, txn, lease grant/keep-alive/revoke, watch — and every one of
them is a POST of a small JSON document to ``/v3/...``; httpx is already a
dependency, is async (the reconciler runs on one asyncio loop), does TLS with
client certificates and keeps connections alive. A round trip on loopback
costs about 0.5-1 ms (``benchmarks/bench_cluster.py`` measures it: the
"etcd round trip" row), which is below anything the placement path needs. The
gateway is served by etcd 3.4 and later under ``/v3/`` (3.3 used
``/v3beta/``; we do not support it).

The gateway's conventions, all handled here: keys and values are base64 in
JSON; 64-bit integers (revisions, lease ids, TTLs) come back as JSON strings;
fields equal to their zero value are left out (a failed txn has no
``succeeded``, a keep-alive of a lease that is gone has no ``TTL``); an error
is ``{"error": …, "code": <gRPC code>}`` with an HTTP status; a keep-alive and
a watch are gRPC streams, which the gateway maps to a POST whose answer is a
stream of ``{"result": …}`` lines (one line for one keep-alive request).

**Endpoints and failover.** The client is given every member's URL. It sends
to the one that answered last; a connection failure, a timeout or an
"unavailable" answer (no leader, request timed out: the member has lost
quorum) moves it to the next, and only when every member failed does a call
raise :class:`EtcdUnavailable`. Writes are not retried on the same member
after a timeout (it may have applied them); every write the reconciler makes
is idempotent (a put of the same state, a txn that compares revisions), so
trying the next member is safe.

**Security.** TLS with a CA (``cacert``) and client certificates
(``cert``/``key``) is httpx's ``verify``/``cert``. With ``user``/``password``
the client asks ``/v3/auth/authenticate`` for a token, sends it in the
``Authorization`` header and asks again once when etcd says it expired. The
password is never part of an error message or a log line.

**Errors** (one tree, here): :class:`EtcdError` is the base;
:class:`EtcdUnavailable` (no member answered or none has quorum: retryable,
the API maps it to 503), :class:`EtcdAuthError` (bad user/password, missing
permission, a client certificate the member refused: not retryable), :class:`EtcdRequestError`
(etcd refused the request: a bug or a version mismatch).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from reconciler.errors import ReconcilerError

DEFAULT_TIMEOUT_S = 2.0  # one call to one member; etcd's own request timeout is 5 s without quorum
UNAVAILABLE_CODES = {4, 14}  # gRPC DEADLINE_EXCEEDED, UNAVAILABLE
AUTH_CODES = {7, 16}  # PERMISSION_DENIED, UNAUTHENTICATED
INVALID_TOKEN = "invalid auth token"
KEEPALIVE = 8  # idle connections kept: httpcore polls each one for every request (gateway/upstream.py)


class EtcdError(ReconcilerError):
    """Something went wrong talking to etcd."""


class EtcdUnavailable(EtcdError):
    """No member answered, or none that answered has quorum. Retryable: the cluster may come back."""


class EtcdAuthError(EtcdError):
    """etcd refused who we are (user/password, role permissions, client certificate)."""


class EtcdRequestError(EtcdError):
    """etcd refused the request itself."""


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that makes a range cover every key starting with ``prefix`` (base64)."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return b64(bytes(raw[: i + 1]))
    return b64(b"\0")


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def json(self) -> Any:
        """The value as JSON, parsed once (a placement reads every node's state)."""
        return self.parsed

    @functools.cached_property
    def parsed(self) -> Any:
        return json.loads(self.value)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> KeyValue:
        return cls(
            key=unb64(raw.get("key")).decode(), value=unb64(raw.get("value")),
            create_revision=int(raw.get("create_revision", 0)), mod_revision=int(raw.get("mod_revision", 0)),
            version=int(raw.get("version", 0)), lease=int(raw.get("lease", 0)),
        )


@dataclass(frozen=True)
class Range:
    revision: int
    kvs: list[KeyValue]


@dataclass(frozen=True)
class Compare:
    """One comparison of a txn: ``target`` of ``key`` ``result`` ``value`` (a revision, version, or bytes)."""

    key: str
    target: Literal["MOD", "CREATE", "VERSION", "VALUE"]
    value: int | bytes
    result: Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"] = "EQUAL"

    def body(self) -> dict[str, Any]:
        field_name = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version",
                      "VALUE": "value"}[self.target]
        value: Any = b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": b64(self.key), "target": self.target, "result": self.result, field_name: value}


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes | str
    lease: int = 0

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": b64(self.key), "value": b64(self.value)}
        if self.lease:
            out["lease"] = str(self.lease)
        return {"request_put": out}


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": b64(self.key)}
        if self.prefix:
            out["range_end"] = prefix_end(self.key)
        return {"request_delete_range": out}


@dataclass(frozen=True)
class Get:
    """A read of ``key`` inside a txn (its count only), which makes a txn that writes nothing linearizable.

    etcd serves a txn whose every operation is a *serializable* read — and so one with no operation at all
    (its ``isTxnSerializable`` holds for an empty list) — from the member's own state, without asking its
    leader: a member cut off from the others answers it, from data as old as its last contact. One plain read
    in the txn makes etcd confirm with a majority first, as for any linearizable read (no raft entry, no
    fsync). ``tests/test_cluster_etcd.py`` shows both on a member that lost its quorum."""

    key: str

    def body(self) -> dict[str, Any]:
        return {"request_range": {"key": b64(self.key), "count_only": True}}


@dataclass(frozen=True)
class Event:
    kind: Literal["PUT", "DELETE"]
    kv: KeyValue


@dataclass
class Tls:
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def verify(self) -> ssl.SSLContext | bool:
        context = ssl.create_default_context(cafile=self.cacert) if self.cacert else ssl.create_default_context()
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context


@dataclass
class Etcd:
    """An etcd v3 client over the JSON gateway; one per process, closed with :meth:`close`."""

    endpoints: Sequence[str]
    timeout_s: float = DEFAULT_TIMEOUT_S
    tls: Tls | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    round_trips: int = 0  # every HTTP call made (benchmarks count etcd round trips per lease)
    _current: int = 0
    _token: str | None = field(default=None, repr=False)
    _client: httpx.AsyncClient | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise EtcdRequestError("no etcd endpoint given (--etcd URL[,URL…] or $RECONCILER_ETCD)")
        self.endpoints = [e.rstrip("/") for e in self.endpoints]
        for endpoint in self.endpoints:
            if not endpoint.startswith(("http://", "https://")):
                raise EtcdRequestError(f"etcd endpoint {endpoint!r} is not a URL: write http://HOST:PORT "
                                       "or https://HOST:PORT")

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            verify = self.tls.verify() if self.tls is not None else True
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=KEEPALIVE)
            self._client = httpx.AsyncClient(timeout=self.timeout_s, verify=verify, limits=limits)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- transport ------------------------------------------------------------------------

    async def call(self, path: str, body: dict[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the current member, failing over to the others; the answer as a dict."""
        failures: list[str] = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._current + step) % count
            endpoint = self.endpoints[index]
            try:
                answer = await self._post(endpoint, path, body, timeout_s)
            except EtcdUnavailable as exc:
                failures.append(f"{endpoint}: {exc}")
                continue
            self._current = index
            return answer
        raise EtcdUnavailable("no etcd member answered: " + "; ".join(failures))

    async def _post(self, endpoint: str, path: str, body: dict[str, Any], timeout_s: float | None,
                    *, retried_auth: bool = False) -> dict[str, Any]:
        headers = {}
        if self.user is not None:
            if self._token is None:
                self._token = await self._authenticate(endpoint)
            headers["Authorization"] = self._token
        self.round_trips += 1
        try:
            response = await self.client.post(f"{endpoint}{path}", json=body, headers=headers,
                                              timeout=timeout_s or self.timeout_s)
        except httpx.TimeoutException:
            raise EtcdUnavailable(f"no answer within {timeout_s or self.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise EtcdUnavailable(_transport_reason(exc, endpoint)) from None
        except ssl.SSLError as exc:  # an alert after the handshake (TLS 1.3) can escape httpx unwrapped
            raise EtcdAuthError(_tls_reason(exc)) from None
        answer = _decode(response)
        error = answer.get("error") or answer.get("message")
        if error is None and response.status_code < 400:
            return answer
        code = int(answer.get("code", 0) or 0)
        text = str(error or f"HTTP {response.status_code}")
        if code in AUTH_CODES and INVALID_TOKEN in text and not retried_auth and self.user is not None:
            self._token = None
            return await self._post(endpoint, path, body, timeout_s, retried_auth=True)
        if code in UNAVAILABLE_CODES or response.status_code in (502, 503, 504):
            raise EtcdUnavailable(text)
        if code in AUTH_CODES or response.status_code in (401, 403):
            raise EtcdAuthError(f"etcd refused {path}: {text} (check --etcd-user and its role's permissions)")
        raise EtcdRequestError(f"etcd refused {path}: {text} (HTTP {response.status_code})")

    async def _authenticate(self, endpoint: str) -> str:
        self.round_trips += 1
        try:
            response = await self.client.post(f"{endpoint}/v3/auth/authenticate",
                                              json={"name": self.user, "password": self.password or ""})
        except httpx.TimeoutException:
            raise EtcdUnavailable("no answer to authenticate") from None
        except httpx.TransportError as exc:
            raise EtcdUnavailable(_transport_reason(exc, endpoint)) from None
        except ssl.SSLError as exc:
            raise EtcdAuthError(_tls_reason(exc)) from None
        answer = _decode(response)
        token = answer.get("token")
        if response.status_code >= 400 or not token:
            code = int(answer.get("code", 0) or 0)
            if code in UNAVAILABLE_CODES:
                raise EtcdUnavailable(str(answer.get("error", "unavailable")))
            raise EtcdAuthError(f"etcd refused user {self.user!r}: {answer.get('error', response.status_code)} "
                                "(check --etcd-user and the password)")
        return str(token)

    # --- kv -------------------------------------------------------------------------------

    async def range(self, key: str, *, prefix: bool = False, serializable: bool = False) -> Range:
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        if serializable:
            body["serializable"] = True
        answer = await self.call("/v3/kv/range", body)
        return Range(revision=_revision(answer), kvs=[KeyValue.parse(kv) for kv in answer.get("kvs", [])])

    async def ranges(self, prefixes: Sequence[str], *, keys_only: bool = False) -> list[Range]:
        """Several prefixes read at one revision, in one round trip (a txn of range requests only, which
        etcd answers as one linearizable read); ``keys_only``: no values, only keys and revisions."""
        reads = []
        for prefix in prefixes:
            read: dict[str, Any] = {"key": b64(prefix), "range_end": prefix_end(prefix)}
            if keys_only:
                read["keys_only"] = True
            reads.append({"request_range": read})
        answer = await self.call("/v3/kv/txn", {"compare": [], "success": reads, "failure": []})
        revision = _revision(answer)
        return [Range(revision, [KeyValue.parse(kv) for kv in (r.get("response_range") or {}).get("kvs", [])])
                for r in answer.get("responses", [])]

    async def get(self, key: str) -> KeyValue | None:
        found = await self.range(key)
        return found.kvs[0] if found.kvs else None

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        body: dict[str, Any] = Put(key, value, lease).body()["request_put"]
        return _revision(await self.call("/v3/kv/put", body))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        body = Delete(key, prefix).body()["request_delete_range"]
        return _revision(await self.call("/v3/kv/deleterange", body))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Put | Delete | Get],
                  failure: Sequence[Put | Delete | Get] = ()) -> tuple[bool, int]:
        """One transaction: (whether every comparison held and ``success`` ran, the revision after)."""
        answer = await self.call("/v3/kv/txn", {
            "compare": [c.body() for c in compare], "success": [op.body() for op in success],
            "failure": [op.body() for op in failure],
        })
        return bool(answer.get("succeeded", False)), _revision(answer)

    # --- leases ---------------------------------------------------------------------------

    async def grant(self, ttl_s: int) -> int:
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; its TTL in seconds, 0 when it is gone (expired or revoked)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go with it); a lease already gone is fine."""
        try:
            await self.call("/v3/kv/lease/revoke", {"ID": str(lease)})
        except EtcdRequestError as exc:
            if "not found" not in str(exc):
                raise

    # --- watch ----------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """The changes under ``prefix`` from ``start_revision`` on, a batch at a time, until cancelled or the
        member goes away (then :class:`EtcdUnavailable`: watch again from the next revision)."""
        body = {"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": str(start_revision)}}
        endpoint = self.endpoints[self._current]
        headers = {"Authorization": self._token} if self.user is not None and self._token else {}
        try:
            async with self.client.stream("POST", f"{endpoint}/v3/watch", json=body, headers=headers,
                                          timeout=httpx.Timeout(self.timeout_s, read=None)) as response:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    events = [Event(kind=e.get("type", "PUT"), kv=KeyValue.parse(e.get("kv", {})))
                              for e in result.get("events", [])]
                    if events:
                        yield events
        except (httpx.TransportError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            self._current = (self._current + 1) % len(self.endpoints)
            raise EtcdUnavailable(f"watch on {endpoint} ended: {_transport_reason(exc, endpoint)}") from None


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        if response.status_code in (502, 503, 504):
            raise EtcdUnavailable(f"HTTP {response.status_code}") from None
        raise EtcdRequestError(f"etcd answered HTTP {response.status_code} with no JSON "
                               "(is this an etcd 3.4+ client URL?)") from None
    if not isinstance(answer, dict):
        raise EtcdRequestError(f"etcd answered {type(answer).__name__}, not an object")
    return answer


def _revision(answer: dict[str, Any]) -> int:
    header = answer.get("header") or answer.get("result", {}).get("header") or {}
    return int(header.get("revision", 0))


def _tls_reason(exc: ssl.SSLError) -> str:
    return f"TLS with etcd failed ({exc}): check --etcd-cacert, --etcd-cert and --etcd-key"


def _transport_reason(exc: BaseException, endpoint: str) -> str:
    text = str(exc) or type(exc).__name__
    dropped = endpoint.startswith("https://") and not isinstance(exc, httpx.ConnectError | httpx.TimeoutException)
    if dropped or "CERTIFICATE" in text.upper() or "SSL" in text.upper():
        return f"{text} (a TLS member closed the connection: check --etcd-cacert, --etcd-cert and --etcd-key)"
    return text
