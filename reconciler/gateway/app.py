"""The gateway's ASGI application: OpenAI and Ollama routes → a service → an implicit lease → the upstream.

Routes (DESIGN §7):

* OpenAI: ``GET /v1/models`` (``/v1/models/{id}``), and every ``POST /v1/…``
  whose JSON body names a ``model`` — ``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/embeddings`` and whatever else the upstream
  speaks — forwarded to the same path of the service that serves the model.
* Ollama: ``GET /api/tags``, ``GET /api/ps``, ``GET /api/version``, ``GET /``
  ("Ollama is running"), ``POST /api/chat``, ``/api/generate``,
  ``/api/embed`` (and the older ``/api/embeddings``): passed through to an
  Ollama, translated (:mod:`.translate`) for a server that speaks only
  OpenAI's API. ``POST /api/show`` (a model's details) is asked of the
  Ollama serving the model when it runs, else answered from the profile:
  a question about a model starts nothing. ``POST /api/pull`` is passed
  to the Ollama that serves (or would pull) the model, its progress relayed
  as it comes, and answered ``success`` for a model an OpenAI-only server
  is given by the profile (:mod:`.pull`).

**One request** (:meth:`Gateway.proxy`): read the body (at most
:data:`MAX_BODY`), find its ``model`` in the routing table (:mod:`.routing`;
unknown: 404 with close names), take a place in the service's gate
(:mod:`.gate`: ``max_concurrent`` in flight, more queue, past ``max_queued``
a 429 with ``Retry-After``), take an implicit lease (:mod:`.leases`: warm,
or a demand that a pass converges: a start, a model switch, evictions),
then send the request to the instance and relay the answer. Everything
after the body counts against the service's wait (``request_wait_s``);
past it, a 503 in the protocol's shape says the plan's reason. The lease
and the place are given back the moment the answer ends, the upstream
fails, or the client goes away.

**Streaming, with no added latency.** A streamed answer (server-sent events
for OpenAI, NDJSON for Ollama) is relayed chunk by chunk as the upstream
sends it — nothing is buffered; each chunk is handed to the server's
transport and the next is read only when that send returns, so a slow
client's backpressure (uvicorn pauses the app while its socket's buffer is
full) reaches the upstream through TCP. A client that goes away — its
connection closed while waiting or mid-stream — cancels the upstream
request (its connection is closed, which is how llama-server and vLLM learn
to stop) and releases the lease at once (:class:`Disconnect`).

**Observability.** Per model (:mod:`reconciler.runtime.traffic`): requests,
in flight, queued, time to first byte, total time, and what the requests
that waited caused; a request that caused a start, a model switch or an
eviction publishes ``gateway.cold`` (naming the model and the client), one
that could not be served in time ``gateway.refused``.

**Auth** (invariant 7): with a token, every call but a read (``GET``,
``HEAD``) needs ``Authorization: Bearer <token>`` — what the OpenAI SDKs send
as their API key. An unexpected error is a 500 in the protocol's shape that
says what went wrong, logged with its traceback; never a dropped connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from starlette.types import Message, Receive, Scope, Send

from reconciler.cluster.node import ClusterNode
from reconciler.core.clock import iso_utc
from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.errors import CallerGone, LeaseRefused, ReconcilerError, Refusal
from reconciler.gateway import translate
from reconciler.gateway.across import Across, forwarded
from reconciler.gateway.causes import Caused, Causes
from reconciler.gateway.gate import Gates, GateTimeout, QueueFull
from reconciler.gateway.leases import ImplicitLeases
from reconciler.gateway.protocols import OLLAMA_VERSION, Answer, Protocol, error, json_answer, parse_duration
from reconciler.gateway.pull import provided, pull_target
from reconciler.gateway.routing import Routes, Target
from reconciler.gateway.upstream import Response, UpstreamError, Upstreams
from reconciler.runtime import Runtime
from reconciler.runtime.leasing import Leasing
from reconciler.runtime.traffic import ModelTraffic

MAX_BODY = 64 * 1024 * 1024  # a request body (images travel base64 inside)
INFO_TIMEOUT_S = 2.0  # asking an Ollama upstream for its tags, ps or version
MIB = 1024 * 1024
FOREVER = "2318-11-18T00:00:00Z"  # what Ollama shows as expires_at for a model kept forever
CLIENT_CLOSED = 499
READS = frozenset({"GET", "HEAD", "OPTIONS"})
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                        b"content-length", b"proxy-authenticate", b"proxy-authorization", b"server", b"date"})
OLLAMA_PATHS = {"/api/chat": "chat", "/api/generate": "generate", "/api/embed": "embed",
                "/api/embeddings": "embeddings"}
UNSET = object()  # a request that says nothing about keep_alive for our instances

log = logging.getLogger("reconciler.gateway")


class Disconnect:
    """Watches the client's connection while its request is served.

    The body has been read, so the next ASGI message is the disconnect. Until
    :meth:`arm` it only sets :attr:`event` (the gate and the leasing service
    watch it and withdraw); armed, it also cancels the task relaying the
    answer, which closes the upstream request.
    """

    def __init__(self, receive: Receive):
        self.event = asyncio.Event()
        self.finished = False  # the answer's last byte is being sent: a disconnect now is the normal end
        self._armed: asyncio.Task[Any] | None = None
        self._task = asyncio.ensure_future(self._watch(receive))

    @property
    def gone(self) -> bool:
        return self.event.is_set()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self.finished:
                    return
                self.event.set()
                if self._armed is not None:
                    self._armed.cancel()
                return

    async def wait(self) -> None:
        await self.event.wait()

    def arm(self) -> None:
        self._armed = asyncio.current_task()

    def disarm(self) -> None:
        self._armed = None

    def close(self) -> None:
        self._armed = None
        self._task.cancel()


@dataclass
class Exchange:
    """What to send upstream for one request, and how to answer the client."""

    protocol: Protocol
    kind: str  # openai: the path; ollama: chat, generate, embed, embeddings
    path: str
    body: bytes
    stream: bool
    translate: bool = False  # Ollama client, OpenAI upstream
    keep_alive: object = UNSET  # seconds (None: clear) for our own instance, after the answer
    shortcut: str | None = None  # "load" / "unload": an Ollama load request, answered without the upstream
    raw: bool = False  # /api/generate with raw: plain completions
    any_model: bool = False  # leases the service, not a model (a pull: the model is not there yet)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Gateway:
    """The ASGI app; :meth:`start` it in the event loop and :meth:`close` it before the leasing service."""

    def __init__(self, runtime: Runtime, profile: Callable[[], Profile], leasing: Leasing, token: str | None,
                 cluster: ClusterNode | None = None):
        self.runtime = runtime
        self.profile = profile
        self.routes = Routes(runtime, profile)
        self.gates = Gates()
        self.leases = ImplicitLeases(runtime, leasing)
        self.causes = Causes(runtime)
        self.upstreams = Upstreams()
        self.info = httpx.AsyncClient(timeout=INFO_TIMEOUT_S, trust_env=False)  # the info routes (tags, ps, show)
        self.traffic = runtime.traffic
        self.clock = runtime.clock
        self.token = token.encode() if token else None
        self.created = int(time.time())
        # cluster mode (--etcd): requests placed across nodes, listings of every node (:mod:`.across`)
        self.across = Across(cluster, self.routes, profile, self.token, self.traffic) if cluster is not None else None

    def start(self) -> None:
        self.leases.start()
        self.causes.start()

    async def close(self) -> None:
        await self.causes.close()
        await self.leases.close()
        self.upstreams.close()
        await self.info.aclose()
        if self.across is not None:
            await self.across.close()

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        protocol: Protocol = "ollama" if path.startswith("/api/") or path == "/" else "openai"
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if self.token is not None and method not in READS and not self._authorized(scope):
                return await self._answer(tracked, error(
                    protocol, 401, "this gateway needs 'Authorization: Bearer <token>' (the token in the server's "
                    "--token-file; an OpenAI SDK sends its api_key so)"))
            if method == "POST" and path == "/api/show":
                return await self._answer(tracked, await self._show(receive))
            if method == "POST" and path == "/api/pull":
                return await self._pull(scope, receive, tracked)
            if method == "POST" and (path.startswith("/v1/") or path in OLLAMA_PATHS):
                return await self.proxy(protocol, path, scope, receive, tracked)
            if method in ("GET", "HEAD"):
                answer = await self._read_route(path)
                if answer is not None:
                    return await self._answer(tracked, answer, head=method == "HEAD")
            what = f"no route {method} {path}"
            return await self._answer(tracked, error(protocol, 404, f"{what}; the gateway serves OpenAI's /v1/models, "
                                                     "POST /v1/chat/completions, /v1/completions, /v1/embeddings and "
                                                     "Ollama's /api/tags, /api/ps, /api/version, POST /api/chat, "
                                                     "/api/generate, /api/embed, /api/show, /api/pull"))
        except CallerGone:
            return None
        except Exception as exc:  # noqa: BLE001 - a client gets an answer that says what went wrong
            log.exception("unexpected error in the gateway: %s %s", method, path)
            if not started:
                await self._answer(tracked, error(protocol, 500, f"internal error: {type(exc).__name__}: {exc}"))
            return None

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)
        return False

    @staticmethod
    async def _answer(send: Send, answer: Answer, *, head: bool = False) -> None:
        await send(answer.start())
        await send({"type": "http.response.body", "body": b"" if head else answer.body})

    # --- reads --------------------------------------------------------------------------------

    async def _read_route(self, path: str) -> Answer | None:
        if path == "/":
            return Answer(200, b"Ollama is running", b"text/plain; charset=utf-8")
        if path == "/v1/models":
            remote = await self.across.elsewhere() if self.across is not None else []
            return json_answer({"object": "list", "data": [
                *(self._model_entry(name, route.service) for name, route in self.routes.names()),
                *(self._model_entry(r.name, r.service) for r in remote)]})
        if path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            target = self.routes.resolve(name)
            if target is not None:
                return json_answer(self._model_entry(name, target.service))
            found = await self.across.find(name) if self.across is not None else None
            if found is None:
                return error("openai", 404, self.routes.unknown(name), param="model")
            return json_answer(self._model_entry(name, found.service))
        if path == "/api/tags":
            remote = await self.across.elsewhere() if self.across is not None else []
            return json_answer({"models": [*await self._tags(),
                                           *(self._tag(r.name, r.service, r.mb) for r in remote)]})
        if path == "/api/ps":
            return json_answer({"models": await self._ps()})
        if path == "/api/version":
            return json_answer({"version": await self._version()})
        return None

    async def _show(self, receive: Receive) -> Answer:
        """Ollama's ``POST /api/show``: a model's details, as Open WebUI asks for them. Asked of the Ollama that
        serves it when it runs (nothing is started or leased for a question); else what the profile knows."""
        raw = await _read_body(receive)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return error("ollama", 400, "the body must be JSON naming a \"model\" (GET /api/tags lists them)")
        target = self.routes.resolve(name)
        if target is None:
            found = await self.across.find(name) if self.across is not None else None
            if found is None:
                return error("ollama", 404, self.routes.unknown(name))
            tag = self._tag(name, found.service, found.mb)  # another node's: what it published
            return json_answer({"modelfile": "", "parameters": "", "template": "", "details": tag["details"],
                                "model_info": {}, "capabilities": ["completion"], "modified_at": tag["modified_at"]})
        if target.api == "ollama" and self._healthy(target.service):
            try:
                response = await self.info.post(f"{target.url}/api/show", json={**body, "model": target.model})
                if response.status_code == 200:
                    return json_answer(response.json())
            except (httpx.HTTPError, ValueError):
                pass  # down or confused meanwhile: say what the profile knows
        tag = self._tag(name, target.service)
        return json_answer({"modelfile": "", "parameters": "", "template": "", "details": tag["details"],
                            "model_info": {}, "capabilities": ["completion"], "modified_at": tag["modified_at"]})

    async def _pull(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ollama's ``POST /api/pull`` (see :mod:`.pull`): relayed from the Ollama that pulls, started if need
        be and held until the pull ends; ``success`` at once for a model an OpenAI-only server is given."""
        arrived = self.clock.monotonic()
        raw = await _read_body(receive)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(name, str) or not name:
            return await self._answer(send, error("ollama", 400, "the body must be JSON naming the \"model\" to "
                                                  "pull, as {\"model\": \"llama3.2:3b\"}"))
        found = pull_target(self.routes, self.profile(), name)
        if isinstance(found, str):
            return await self._answer(send, error("ollama", 404, found))
        stream = body.get("stream") is not False
        if found.api != "ollama":
            return await self._answer(send, provided(stream))
        exchange = Exchange("ollama", "pull", "/api/pull", _dump({**body, "model": found.model}), stream,
                            any_model=True)
        watch = Disconnect(receive)
        try:
            await self._serve(exchange, found, _client(scope), send, watch,
                              self.traffic.of(found.model, found.service), arrived)
        finally:
            watch.close()
            self.runtime.wake()  # a pass soon: its probe lists the model pulled, which routes it
        return None

    def _model_entry(self, name: str, service: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": service}

    def _healthy(self, service: str) -> bool:
        last = self.runtime.last_pass()
        probe = last.snapshot.probes.get(service) if last is not None else None
        return probe is not None and probe.healthy

    async def _ollama_get(self, service: str, path: str) -> Any:
        """An Ollama upstream's answer to ``GET path`` (None when it is down or says nothing useful)."""
        spec = self.profile().services.get(service)
        if spec is None or spec.probe_port is None or not self._healthy(service):
            return None
        try:
            response = await self.info.get(f"{spec.base_url or ''}{path}")
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _ollamas(self) -> list[str]:
        profile = self.profile()
        return sorted({route.service for _, route in self.routes.names() if route.api == "ollama"},
                      key=lambda s: (profile.services[s].priority, s) if s in profile.services else (0, s))

    async def _tags(self) -> list[dict[str, object]]:
        live: dict[str, dict[str, Any]] = {}
        ollamas = self._ollamas()
        for answer in await asyncio.gather(*(self._ollama_get(s, "/api/tags") for s in ollamas)):
            for entry in _listed(answer):
                if isinstance(entry.get("name"), str):
                    live.setdefault(entry["name"], entry)
        out = []
        for name, route in self.routes.names():
            own = live.get(name) if route.api == "ollama" else None
            out.append(dict(own, name=name, model=name) if own is not None else self._tag(name, route.service))
        return out

    def _tag(self, name: str, service: str, mb: int | None = None) -> dict[str, object]:
        spec = self.profile().services.get(service) if mb is None else None
        size = (mb if mb is not None else spec.ceiling_mb(name) if spec is not None else 0) * MIB
        return {"name": name, "model": name, "modified_at": iso_utc(self.clock.now()), "size": size,
                "digest": "", "details": {"parent_model": "", "format": "", "family": service, "families": [service],
                                          "parameter_size": "", "quantization_level": ""}}

    async def _ps(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        profile, now = self.profile(), self.clock.now()
        ollamas = set(self._ollamas())
        for instance in self.runtime.store.instances():
            spec = profile.services.get(instance.service)
            if spec is None or instance.state != "running" or spec.probe_port is None:
                continue
            if instance.service in ollamas:
                out += _listed(await self._ollama_get(instance.service, "/api/ps"))
                continue
            served = [instance.model] if instance.model else [n for n, r in self.routes.names()
                                                              if r.service == instance.service and r.declared]
            said = self.runtime.keep_alive.get(instance.service)  # an Ollama request's keep_alive, if one said
            keep = said if said is not None else (spec.idle_stop_after_s or -1)
            if spec.always_on or instance.origin == "adopted" or keep < 0:
                expires = FOREVER
            else:
                expires = iso_utc((self.runtime.ledger.idle_since(instance) or now) + timedelta(seconds=keep))
            for name in served:
                entry = self._tag(name, instance.service)
                entry.update({"size_vram": spec.ceiling_mb(name) * MIB if instance.gpu is not None else 0,
                              "expires_at": expires})
                out.append(entry)
        return out

    async def _version(self) -> str:
        for service in self._ollamas():
            answer = await self._ollama_get(service, "/api/version")
            if isinstance(answer, dict) and isinstance(answer.get("version"), str):
                return str(answer["version"])
        return OLLAMA_VERSION

    # --- a request for a model -----------------------------------------------------------------

    async def proxy(self, protocol: Protocol, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = self.clock.monotonic()
        raw = await _read_body(receive)
        if raw is None:
            return await self._answer(send, error(protocol, 413, f"the request body is over {MAX_BODY // MIB} MiB"))
        try:
            body = json.loads(raw)
        except ValueError:
            return await self._answer(send, error(protocol, 400, "the body is not JSON; send a JSON object with "
                                                  "Content-Type: application/json"))
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(model, str) or not model:
            return await self._answer(send, error(protocol, 400, "the body must be a JSON object that names a "
                                                  "\"model\" (GET /v1/models or /api/tags lists them)", param="model"))
        placement = forwarded(scope) if self.across is not None else ""
        if self.across is not None and placement is None:  # cluster mode, from a client: placed across nodes
            watch = Disconnect(receive)
            try:
                await self.across.serve(
                    protocol, path, scope, raw, model, self.routes.resolve(model) is not None, send, watch,
                    lambda p: self._here(protocol, path, scope, body, raw, model, send, arrived, watch, p),
                    self._answer)
            finally:
                watch.close()
            return None
        return await self._here(protocol, path, scope, body, raw, model, send, arrived, receive, placement)

    async def _here(self, protocol: Protocol, path: str, scope: Scope, body: dict[str, Any], raw: bytes, model: str,
                    send: Send, arrived: float, receive: Receive | Disconnect, placement: str | None) -> None:
        """A request served by this node, as on one machine; ``receive`` is the client's connection, or the
        :class:`Disconnect` already watching it; ``placement`` the cluster placement this answers, if any."""
        try:
            await self._serve_here(protocol, path, scope, body, raw, model, send, arrived, receive)
        finally:
            if placement and self.across is not None:
                self.across.cluster.answered(placement)

    async def _serve_here(self, protocol: Protocol, path: str, scope: Scope, body: dict[str, Any], raw: bytes,
                          model: str, send: Send, arrived: float, receive: Receive | Disconnect) -> None:
        target = self.routes.resolve(model)
        if target is None:
            return await self._answer(send, error(protocol, 404, self.routes.unknown(model), param="model"))
        try:
            exchange = self._exchange(protocol, path, scope, body, raw, target)
        except ValueError as exc:
            return await self._answer(send, error(protocol, 400, str(exc)))
        client = _client(scope)
        traffic = self.traffic.of(target.model, target.service)
        if exchange.shortcut == "unload":  # Ollama: unload it; nothing is started for that
            self.leases.keep_alive(target.service, 0)
            return await self._load_answer(send, exchange, target, traffic, arrived)
        if isinstance(receive, Disconnect):  # already watched (placed across the cluster): its owner closes it
            return await self._serve(exchange, target, client, send, receive, traffic, arrived)
        watch = Disconnect(receive)
        try:
            await self._serve(exchange, target, client, send, watch, traffic, arrived)
        finally:
            watch.close()
        return None

    def _exchange(self, protocol: Protocol, path: str, scope: Scope, body: dict[str, Any], raw: bytes,
                  target: Target) -> Exchange:
        """What goes upstream: passed through (the model's upstream name in place of an alias) or translated."""
        query = scope.get("query_string") or b""
        if protocol == "openai" or target.api == "ollama":
            kind = OLLAMA_PATHS.get(path, path)
            stream = body.get("stream") is True if protocol == "openai" else (
                kind in ("chat", "generate") and body.get("stream") is not False)
            if body["model"] != target.model:
                body = dict(body, model=target.model)
                raw = json.dumps(body).encode()
            full = path + ("?" + query.decode("latin-1") if query else "")
            return Exchange(protocol, kind, full, raw, stream)
        kind = OLLAMA_PATHS[path]
        keep_alive: object = parse_duration(body.get("keep_alive"))  # ValueError: a 400 saying what is accepted
        stream = kind in ("chat", "generate") and body.get("stream") is not False
        if kind == "chat":
            messages = body.get("messages")
            out = translate.chat_request(body, target.model, stream)
            exchange = Exchange(protocol, kind, "/v1/chat/completions", _dump(out), stream, True, keep_alive)
            if not messages:
                exchange.shortcut = "unload" if keep_alive == 0 else "load"
            return exchange
        if kind == "generate":
            upstream, out = translate.generate_request(body, target.model, stream)
            exchange = Exchange(protocol, kind, upstream, _dump(out), stream, True, keep_alive,
                                raw=bool(body.get("raw")))
            if not body.get("prompt") and not body.get("images"):
                exchange.shortcut = "unload" if keep_alive == 0 else "load"
            return exchange
        return Exchange(protocol, kind, "/v1/embeddings", _dump(translate.embed_request(body, target.model)), False,
                        True, keep_alive)

    async def _serve(self, exchange: Exchange, target: Target, client: str, send: Send, watch: Disconnect,
                     traffic: ModelTraffic, arrived: float) -> None:
        """Gate, lease, relay — each step within the service's wait; gives back what it took."""
        spec = target.spec
        gate = self.gates.of(target.service, target.slots, spec.max_queued, target.switches)
        deadline = arrived + spec.wait_s
        traffic.queued += 1
        waiting, entered = True, False
        try:
            try:
                await gate.enter(target.model, deadline - self.clock.monotonic(), watch.event)
                entered = True
                granted = await self.leases.acquire(target.service, None if exchange.any_model else target.model,
                                                    client, deadline - self.clock.monotonic(), watch.wait)
            except QueueFull as full:
                return await self._refuse(send, exchange, target, client, traffic, arrived, 429,
                                          f"model {target.asked!r}: {full.queued} requests already wait for "
                                          f"{target.service} (max_queued {spec.max_queued}, {target.slots} in "
                                          "flight at most); retry later", self._retry_after(traffic, gate.queued))
            except GateTimeout:
                return await self._refuse(send, exchange, target, client, traffic, arrived, 503,
                                          f"model {target.asked!r}: no free slot of {target.service} within "
                                          f"{spec.wait_s:g} s ({gate.in_flight} of {target.slots} in flight, "
                                          f"{gate.queued} waiting)")
            except LeaseRefused as refused:
                status = {Refusal.QUEUE_FULL: 429, Refusal.UNKNOWN_SERVICE: 404}.get(refused.refusal, 503)
                return await self._refuse(send, exchange, target, client, traffic, arrived, status,
                                          f"model {target.asked!r} ({target.service}): {refused.detail}",
                                          self._retry_after(traffic, gate.queued) if status == 429 else None)
            except CallerGone:
                traffic.disconnected += 1
                return None
            traffic.queued -= 1
            waiting = False
            lease_id = granted.lease.id
            if watch.gone:  # granted the moment its client went away
                await self.leases.release(lease_id)
                traffic.disconnected += 1
                return None
            pid = None
            if not granted.warm:
                pid = self._cold(target, client, granted.lease.id, granted.waited_s, traffic)
            traffic.in_flight += 1
            try:
                if exchange.shortcut == "load":
                    await self._load_answer(send, exchange, target, traffic, arrived)
                else:
                    await self._relay(exchange, target, send, watch, traffic, arrived, pid)
            finally:
                traffic.in_flight -= 1
                if exchange.keep_alive is not UNSET:
                    self.leases.keep_alive(target.service, exchange.keep_alive)  # type: ignore[arg-type]
                await self.leases.release(lease_id)
        finally:
            if waiting:
                traffic.queued -= 1
            if entered:
                gate.leave()

    def _cold(self, target: Target, client: str, demand_id: str, waited_s: float, traffic: ModelTraffic) -> int | None:
        """A request that waited for a pass: what it caused is counted and announced once that pass has
        ended (:mod:`.causes`); returns the instance's pid (its pool may be a new one)."""

        def report(caused: list[Caused]) -> None:
            for cause in caused:
                if cause.kind in traffic.caused:
                    traffic.caused[cause.kind] += 1
            if caused:
                words = ", ".join(c.words() for c in caused)
                self.runtime.events.publish(
                    EventKind.GATEWAY_COLD, service=target.service, model=target.model, asked=target.asked,
                    client=client, waited_s=round(waited_s, 3),
                    caused=[{"kind": c.kind, "service": c.service, "model": c.model} for c in caused],
                    message=f"model {target.asked} for {client or 'a client'}: {words}; waited {waited_s:.2f} s")

        self.causes.granted(demand_id, report)
        instance = self.runtime.store.get_instance(target.service)
        return instance.pid if instance is not None else None

    async def _refuse(self, send: Send, exchange: Exchange, target: Target, client: str, traffic: ModelTraffic,
                      arrived: float, status: int, message: str, retry_after_s: float | None = None) -> None:
        if status == 503:
            self.runtime.events.publish(EventKind.GATEWAY_REFUSED, service=target.service, model=target.model,
                                        asked=target.asked, client=client, status=status, message=message)
        answer = error(exchange.protocol, status, message, param="model" if status == 404 else None,
                       retry_after_s=retry_after_s if retry_after_s is not None else (
                           5.0 if status == 503 else None))
        await self._answer(send, answer)
        traffic.answered(status, self.clock.monotonic() - arrived)

    @staticmethod
    def _retry_after(traffic: ModelTraffic, queued: int) -> float:
        """Seconds until a place is likely free: the recent mean request time × those ahead, 1 to 60."""
        mean = (traffic.total.total_s / traffic.total.count) if traffic.total.count else 1.0
        return min(60.0, max(1.0, math.ceil(mean * max(1, queued))))

    async def _load_answer(self, send: Send, exchange: Exchange, target: Target, traffic: ModelTraffic,
                           arrived: float) -> None:
        """Ollama's answer to a load (or unload) request: the model is ready (or going) — no prompt, no upstream."""
        line: dict[str, object] = {"model": target.asked, "created_at": translate.now_iso()}
        line.update({"message": {"role": "assistant", "content": ""}} if exchange.kind == "chat" else {"response": ""})
        line.update({"done": True, "done_reason": exchange.shortcut or "load"})
        traffic.ttfb.observe(self.clock.monotonic() - arrived)
        await self._answer(send, json_answer(line))
        traffic.answered(200, self.clock.monotonic() - arrived)

    # --- the upstream ------------------------------------------------------------------------------

    async def _relay(self, exchange: Exchange, target: Target, send: Send, watch: Disconnect, traffic: ModelTraffic,
                     arrived: float, pid: int | None) -> None:
        """Send the request to the instance and relay its answer, chunk by chunk; cancelled when the client goes."""
        upstream = self.upstreams.of(target.service, target.url, pid)
        status = 0
        watch.arm()
        try:
            try:
                response = await upstream.send("POST", exchange.path, exchange.body)
            except UpstreamError as exc:
                status = 502
                message = (f"model {target.asked!r}: the model server of {target.service} at {target.url} did not "
                           f"answer ({exc}); `reconciler logs {target.service}` shows what it said")
                await self._answer(send, error(exchange.protocol, 502, message))
                return
            try:
                status = response.status
                if exchange.translate:
                    await self._translated(exchange, target, response, send, watch, traffic, arrived)
                else:
                    await self._passed(exchange, response, send, watch, traffic, arrived)
            finally:
                response.close()
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            status = CLIENT_CLOSED
            traffic.disconnected += 1
        except (UpstreamError, ReconcilerError) as exc:  # the upstream broke off mid-answer: the client's ends
            log.warning("gateway: %s %s: the model server broke off: %s", target.service, exchange.path, exc)
        finally:
            watch.disarm()
            if status:
                traffic.answered(status, self.clock.monotonic() - arrived)

    async def _passed(self, exchange: Exchange, response: Response, send: Send, watch: Disconnect,
                      traffic: ModelTraffic, arrived: float) -> None:
        headers = [(k, v) for k, v in response.headers if k not in HOP_BY_HOP]
        if not exchange.stream:
            body = await response.read()
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            traffic.ttfb.observe(self.clock.monotonic() - arrived)
            watch.finished = True
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [*headers, (b"x-accel-buffering", b"no")]})
        first = True
        async for chunk in response.pieces():
            if first:
                traffic.ttfb.observe(self.clock.monotonic() - arrived)
                first = False
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        watch.finished = True
        await send({"type": "http.response.body", "body": b""})

    async def _translated(self, exchange: Exchange, target: Target, response: Response, send: Send,
                          watch: Disconnect, traffic: ModelTraffic, arrived: float) -> None:
        started_ns = time.monotonic_ns() - int((self.clock.monotonic() - arrived) * 1e9)
        kind = "chat" if exchange.kind == "chat" else "generate"
        if response.status >= 400:
            body = await response.read()
            watch.finished = True
            await self._answer(send, error("ollama", response.status, translate.error_text(body, response.status)))
            traffic.ttfb.observe(self.clock.monotonic() - arrived)
            return
        if not exchange.stream:
            body = await response.read()
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                watch.finished = True
                await self._answer(send, error("ollama", 502, f"the model server of {target.service} answered "
                                                              "something that is not JSON"))
                return
            if exchange.kind in ("embed", "embeddings"):
                out = translate.embed_answer(parsed, target.asked, exchange.kind == "embeddings", started_ns)
            else:
                out = translate.complete_answer(parsed, target.asked, kind, started_ns)
            traffic.ttfb.observe(self.clock.monotonic() - arrived)
            watch.finished = True
            await self._answer(send, json_answer(out))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson"), (b"x-accel-buffering", b"no")]})
        stream = translate.StreamTranslator(target.asked, kind, started_ns)
        first = True
        try:
            async for chunk in response.pieces():
                lines = stream.feed(chunk)
                if lines:
                    if first:
                        traffic.ttfb.observe(self.clock.monotonic() - arrived)
                        first = False
                    await send({"type": "http.response.body", "body": lines, "more_body": True})
        except UpstreamError as exc:
            tail = stream.cut_short(f"the model server of {target.service} broke off: {exc}")
        else:
            if stream.done:
                tail = b""
            elif stream.reason is not None:  # finished, without the [DONE] line some servers leave out
                tail = stream.finish()
            else:
                tail = stream.cut_short(f"the model server of {target.service} ended the stream before the answer")
        watch.finished = True
        await send({"type": "http.response.body", "body": tail})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when it is over :data:`MAX_BODY`; CallerGone when the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise CallerGone("the client went away while sending its request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _listed(answer: Any) -> list[dict[str, Any]]:
    """The ``models`` of an Ollama's ``/api/tags`` or ``/api/ps`` answer (none when it is not one)."""
    models = answer.get("models") if isinstance(answer, dict) else None
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = ["MAX_BODY", "Disconnect", "Gateway"]
