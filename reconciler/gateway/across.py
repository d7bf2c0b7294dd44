"""The gateway in a cluster (DESIGN §8): a request for a model is placed across nodes, and proxied there.

Only used when the server runs with ``--etcd`` (:class:`Across` is made then); on one
machine none of this runs and the gateway answers exactly as before.

**Publishing.** Each node's gateway hands its routing table (:meth:`Across.models`: name →
service, the name its upstream knows, protocol, MB) to the cluster companion, which publishes
it with the node's state; the node record carries the gateway's URL on the advertised host. So
every node knows which models every live node's gateway serves, and where it answers.

**Placing a request** (:meth:`Across.serve`). A request for a model that arrives from a client
is placed by :meth:`reconciler.cluster.node.ClusterNode.place_model`: the rule of ``POST
/v1/leases`` (warm first anywhere, then where it fits without eviction, then least eviction
cost, then where it may queue), each node scored on the service *its* gateway routes the model
to, confirmed the same way (no etcd call when this node chooses itself). The node asked is a candidate like any
other: a model served here but warm elsewhere goes elsewhere; one served only elsewhere too.
When this node is chosen the request takes the local path (gate, implicit lease, relay) as on
one machine; otherwise it is proxied to the chosen node's gateway, marked with
``X-Reconciler-Forwarded`` (that gateway serves it locally, without placing it again) and the
placement id (dropped from etcd once answered), with the cluster's token. The protocols have no
field to pin a node, so a gateway request is never pinned.

**Counting.** A proxied request is counted in full (requests, latencies, what it caused) by the
node that served it, and by the node asked only as ``proxied`` to that node (per model, in the
status document and ``reconciler_gateway_proxied_total``): summing ``requests`` over the nodes
counts each request once, and the node asked still shows where its clients' requests went.

**Relaying.** The chosen gateway's answer is relayed as it comes: status, headers, then each
chunk as it is read — a stream (SSE, NDJSON) is never buffered, and the next chunk is read only
once the previous one went to the client, so backpressure reaches the serving node. A client
that goes away cancels the relay, which closes the connection to the serving gateway, which
cancels its own upstream request and releases its lease (its :class:`~.app.Disconnect`).

**Nodes that die.** A chosen gateway that cannot be reached (it died after the view was read)
is left out and the request placed again, at most :data:`REPLACE_ATTEMPTS` times. Once a dead
node has left the view (one TTL) its models are served by the nodes that still serve them; a
model no live node serves is a 404 in the protocol's shape, one that no node can take now a
503 with each node's reason.

**etcd unreachable.** A gateway cut off from etcd keeps serving what it serves itself, as one
machine would (its services keep running, DESIGN §8); a request for a model served only
elsewhere is a 503 saying that the cluster state is unavailable.

**Listing.** ``GET /v1/models``, ``/v1/models/{id}``, ``/api/tags`` and ``/api/show`` also
know the models of every other live node (:meth:`Across.elsewhere`), from the watched view
(no etcd round trip); this node's own entries come first, as on one machine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import Scope, Send

from reconciler.cluster.etcd import EtcdError
from reconciler.cluster.node import FORWARDED, PLACEMENT, ClusterNode, ClusterRefused, Placed
from reconciler.cluster.placement import route_of
from reconciler.core.profile import Profile
from reconciler.gateway.protocols import Protocol, error
from reconciler.gateway.routing import Routes
from reconciler.gateway.upstream import CONNECT_S, READ_S
from reconciler.runtime.traffic import Traffic

REPLACE_ATTEMPTS = 3
NODE_KEEPALIVE = 8  # idle connections kept to another node's gateway: httpcore scans them all per request
PASSED_BACK = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                         b"server", b"date"})

log = logging.getLogger("reconciler.gateway")


@dataclass(frozen=True)
class Remote:
    """A model another live node's gateway serves."""

    name: str
    service: str
    mb: int
    nodes: tuple[str, ...]


def forwarded(scope: Scope) -> str | None:
    """The placement id of a request another node's gateway placed here ("" without one); None when a
    client sent it (then it is placed)."""
    headers: dict[bytes, bytes] = dict(scope.get("headers", ()))
    if FORWARDED.lower().encode() not in headers:
        return None
    return headers.get(PLACEMENT.lower().encode(), b"").decode("latin-1")


class Across:
    """Placement and proxying of gateway requests across the nodes of a cluster."""

    def __init__(self, cluster: ClusterNode, routes: Routes, profile: Callable[[], Profile], token: bytes | None,
                 traffic: Traffic | None = None):
        self.cluster = cluster
        self.routes = routes
        self.profile = profile
        self.token = token
        self.proxied = 0  # requests answered by another node's gateway
        self.traffic = traffic  # per model: what this gateway placed elsewhere (``proxied``, by node)
        # node → an httpx client for its gateway (kept-alive connections between nodes; the local upstreams'
        # lean client, reconciler.gateway.upstream, is for loopback model servers)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._retiring: set[asyncio.Future[None]] = set()

    def _client(self, node: str, url: str) -> httpx.AsyncClient:
        client = self._clients.get(node)
        if client is not None and str(client.base_url).rstrip("/") == url.rstrip("/"):
            return client
        if client is not None:  # the node came back on another address: the old connections are useless
            retired = asyncio.ensure_future(client.aclose())
            self._retiring.add(retired)  # held until done (the loop keeps only weak references to tasks)
            retired.add_done_callback(self._retiring.discard)
        client = self._clients[node] = httpx.AsyncClient(
            base_url=url, timeout=httpx.Timeout(connect=CONNECT_S, read=READ_S, write=READ_S, pool=None),
            limits=httpx.Limits(max_keepalive_connections=NODE_KEEPALIVE),
            headers={"accept-encoding": "identity"}, trust_env=False)
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def models(self) -> dict[str, dict[str, Any]]:
        """This gateway's routing table as it is published: name → service, model, api, declared, mb."""
        profile = self.profile()
        out: dict[str, dict[str, Any]] = {}
        for name, route in self.routes.names():
            spec = profile.services.get(route.service)
            out[name] = {"service": route.service, "model": route.model, "api": route.api,
                         "declared": route.declared, "mb": spec.ceiling_mb(name) if spec is not None else 0}
        return out

    async def elsewhere(self) -> list[Remote]:
        """The models other live nodes' gateways serve that this one does not, by name; [] when etcd
        cannot be read (then each node lists its own)."""
        try:
            view = await self.cluster.current()
        except EtcdError:
            return []
        own = self.routes.table()
        found: dict[str, Remote] = {}
        for node, state in sorted(view.alive_states().items()):
            if node == self.cluster.node or not state.get("gateway"):
                continue
            for name, route in (state.get("models") or {}).items():
                if name in own:
                    continue
                known = found.get(name)
                nodes = (*known.nodes, node) if known is not None else (node,)
                found[name] = Remote(name, str(route.get("service", "")), int(route.get("mb", 0) or 0), nodes)
        return [found[name] for name in sorted(found)]

    async def find(self, name: str) -> Remote | None:
        """Another live node's model ``name`` (Ollama's tag rule applied), or None."""
        try:
            view = await self.cluster.current()
        except EtcdError:
            return None
        for node, state in sorted(view.alive_states().items()):
            route = route_of(state, name) if node != self.cluster.node else None
            if route is not None:
                mb = int(((state.get("models") or {}).get(name) or {}).get("mb", 0) or 0)
                return Remote(name, route.service, mb, (node,))
        return None

    async def serve(self, protocol: Protocol, path: str, scope: Scope, raw: bytes, model: str, served_here: bool,
                    send: Send, watch: Any, local: Callable[[str | None], Awaitable[None]],
                    answer: Callable[[Send, Any], Awaitable[None]]) -> None:
        """Place a request for ``model`` and have it answered: by ``local`` (this node chosen; it gets the
        placement id to mark answered) or by the chosen node's gateway, relayed to ``send``."""
        excluded: set[str] = set()
        for _ in range(REPLACE_ATTEMPTS):
            try:
                placed = await self.cluster.place_model(model, exclude=frozenset(excluded))
            except ClusterRefused as refused:
                if refused.status == 404 and served_here and not excluded:  # not published yet: ours anyway
                    return await local(None)
                if refused.status == 404:
                    return await answer(send, error(protocol, 404, f"{self.routes.unknown(model)}; {refused.detail}",
                                                    param="model"))
                return await answer(send, error(protocol, refused.status, refused.detail, retry_after_s=5.0))
            except EtcdError as exc:
                if served_here:  # cut off from etcd: serve what we serve, as one machine would
                    return await local(None)
                return await answer(send, error(
                    protocol, 503, f"model {model!r} is not served on this node and the cluster state is "
                    f"unavailable (etcd: {exc}); retry in a moment", retry_after_s=5.0))
            if watch.gone:  # the client left while it was placed
                self.cluster.answered(placed.placement)
                return None
            if placed.local:
                return await local(placed.placement)
            if not placed.gateway:  # published without a gateway since: not a candidate next time
                self.cluster.answered(placed.placement)
                excluded.add(placed.node)
                continue
            try:
                return await self._relay(placed, path, scope, raw, send, watch)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:  # reached, but silent
                return await answer(send, error(protocol, 504, f"model {model!r}: node {placed.node}'s gateway "
                                                               f"did not answer in time ({type(exc).__name__})"))
            except httpx.TransportError as exc:  # it went away since the view was read: place it again
                log.warning("gateway: node %s did not answer for %s (%s); placing it again", placed.node, model, exc)
                excluded.add(placed.node)
            finally:
                self.cluster.answered(placed.placement)  # the placer's record: in flight no more
        return await answer(send, error(protocol, 503, f"model {model!r}: the nodes chosen "
                                                       f"({', '.join(sorted(excluded))}) did not answer; retry",
                                        retry_after_s=5.0))

    async def _relay(self, placed: Placed, path: str, scope: Scope, raw: bytes, send: Send, watch: Any) -> None:
        """Send the request to the chosen node's gateway and relay its answer chunk by chunk. Raises
        httpx.TransportError only when nothing was sent to the client yet (the caller places it again)."""
        client = self._client(placed.node, placed.gateway)
        query = scope.get("query_string") or b""
        headers = {"content-type": "application/json", FORWARDED: self.cluster.node, PLACEMENT: placed.placement}
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token.decode()}"
        request = client.build_request("POST", path + ("?" + query.decode("latin-1") if query else ""),
                                       content=raw, headers=headers)
        watch.arm()
        try:
            response = await client.send(request, stream=True)  # TransportError: not reached, nothing sent
            self.proxied += 1
            if self.traffic is not None:
                counted = self.traffic.of(placed.model or "", placed.service).proxied
                counted[placed.node] = counted.get(placed.node, 0) + 1
            try:
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [(k.lower(), v) for k, v in response.headers.raw
                                        if k.lower() not in PASSED_BACK]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                watch.finished = True
                await send({"type": "http.response.body", "body": b""})
            except httpx.HTTPError as exc:  # broke off mid-answer: the client's answer ends there
                log.warning("gateway: node %s broke off its answer: %s", placed.node, exc)
            finally:
                await response.aclose()
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the client went away: the connection to the serving node is closed
        finally:
            watch.disarm()


__all__ = ["Across", "Remote", "forwarded"]
