"""Cluster mode in the API: ``GET /v1/cluster``, and lease requests placed across nodes.

Only used when the server runs with ``--etcd`` (:attr:`ApiContext.cluster`); on one
machine none of this runs. A ``POST /v1/leases`` that arrives from a client is placed
by :meth:`reconciler.cluster.node.ClusterNode.place` (the watched view, then one etcd read that confirms
a choice of another node; none when this node chooses itself) and
then answered here (when this node was chosen) or forwarded to the chosen node's API,
marked with ``X-Reconciler-Forwarded`` so that node answers it locally, as on one
machine. When the chosen node cannot be reached (it died since the read) the request
is placed again without it, at most :data:`REPLACE_ATTEMPTS` times: a demand whose node
went away is re-placed on a survivor. Renewing, reading or releasing a lease that
another node holds is forwarded to that node (found through its ``leases/<id>`` key);
a lease whose node is gone is a 404, and its holder asks again.

Status codes: what the serving node answered, as is; 503 when etcd cannot be read or
written (no quorum, every member down: ``detail`` says so; local services are not
touched) or no node can take it; 404 for a pinned node that is not alive or a service
no node has.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from reconciler.api.context import ApiContext
from reconciler.api.models import LeaseRequest
from reconciler.cluster.etcd import EtcdError
from reconciler.cluster.node import FORWARDED, ClusterNode, ClusterRefused

REPLACE_ATTEMPTS = 3
log = logging.getLogger("reconciler.cluster")
FORWARD_SLACK_S = 15.0  # beyond the request's own wait_s


def forwarded(request: Request) -> bool:
    return FORWARDED.lower() in request.headers


def unavailable(exc: EtcdError) -> HTTPException:
    return HTTPException(503, f"cluster state unavailable (etcd: {exc}); this node's services keep running; "
                              "retry in a moment")


def cluster_of(ctx: ApiContext) -> ClusterNode:
    if ctx.cluster is None:
        raise HTTPException(404, "this server is not in a cluster (start it with --etcd URL --node NAME)")
    return ctx.cluster


async def place(body: LeaseRequest, ctx: ApiContext) -> tuple[str, str | None, str] | Response:
    """Where the request goes: ("local", None, placement) or ("remote", url, placement) — or the answer
    itself when a remote node answered (or it could not be placed)."""
    cluster = cluster_of(ctx)
    excluded: set[str] = set()
    for _ in range(REPLACE_ATTEMPTS):
        try:
            placed = await cluster.place(body.service, body.model, pin=body.node, exclude=frozenset(excluded))
        except ClusterRefused as refused:
            raise HTTPException(refused.status, refused.detail) from None
        except EtcdError as exc:
            raise unavailable(exc) from None
        except (OSError, ValueError) as exc:  # what a broken connection to etcd may still raise: answer, and log it
            log.warning("placement of %s failed", body.service, exc_info=True)
            raise HTTPException(503, f"placement failed ({type(exc).__name__}: {exc}); retry") from None
        if placed.local:
            return "local", None, placed.placement
        doc = body.model_dump()
        doc["node"] = placed.node
        try:
            status, answer = await cluster.forward("POST", f"{placed.url}/v1/leases", doc, placement=placed.placement,
                                                   timeout_s=body.wait_s + FORWARD_SLACK_S)
        except httpx.TransportError:
            excluded.add(placed.node)  # it went away since we read the view: place it again without it
            continue
        finally:
            cluster.answered(placed.placement)
        if status == 200 and isinstance(answer, dict) and "id" in answer:
            cluster.remember(str(answer["id"]), placed.node, placed.url)
        return JSONResponse(answer, status_code=status)
    raise HTTPException(503, f"{body.service}: the nodes chosen ({', '.join(sorted(excluded))}) did not answer; "
                             "retry")


async def allocate_on(ctx: ApiContext, service: str, model: str, doc: dict[str, Any],
                      wait_s: float) -> str | Response | None:
    """cf-orch ``allocate`` of one model candidate in a cluster: None when this node should serve it, the
    chosen node's answer when another one did, or why no node can serve this candidate (the caller then
    tries the next one)."""
    cluster = cluster_of(ctx)
    excluded: set[str] = set()
    for _ in range(REPLACE_ATTEMPTS):
        try:
            placed = await cluster.place(service, model, exclude=frozenset(excluded))
        except ClusterRefused as refused:
            return refused.detail
        except EtcdError as exc:
            raise unavailable(exc) from None
        if placed.local:
            cluster.answered(placed.placement)
            return None
        try:
            status, answer = await cluster.forward(
                "POST", f"{placed.url}/api/services/{service}/allocate", {**doc, "model_candidates": [model]},
                placement=placed.placement, timeout_s=wait_s + FORWARD_SLACK_S)
        except httpx.TransportError:
            excluded.add(placed.node)
            continue
        finally:
            cluster.answered(placed.placement)
        if status == 200 and isinstance(answer, dict) and "allocation_id" in answer:
            cluster.remember(str(answer["allocation_id"]), placed.node, placed.url)
            return JSONResponse(answer)
        detail = answer.get("detail") if isinstance(answer, dict) else None
        return f"{detail or f'HTTP {status}'} (on node {placed.node})"
    return f"the nodes chosen ({', '.join(sorted(excluded))}) did not answer"


ANYWHERE = "*"  # cf-orch's node_id for a VRAM lease that may go to any node of the cluster


async def vram_on(ctx: ApiContext, doc: dict[str, Any], mb: int, gpu: int | None,
                  pin: str | None) -> tuple[int, str] | Response:
    """cf-orch ``POST /api/leases`` in a cluster: (GPU, placement) when this node should grant it, else the
    chosen node's answer. Placed by :meth:`ClusterNode.place_vram` (the GPU with the most free MB, anywhere
    or on the pinned node); a chosen node that does not answer, or that has no longer room when asked (a
    race with its own starts), is left out and the lease placed again."""
    cluster = cluster_of(ctx)
    excluded: set[str] = set()
    last = ""
    for _ in range(REPLACE_ATTEMPTS):
        try:
            placed = await cluster.place_vram(mb, gpu, pin=pin, exclude=frozenset(excluded))
        except ClusterRefused as refused:
            if last and refused.status == 503:
                raise HTTPException(503, f"{refused.detail}; {last}") from None
            raise HTTPException(refused.status, refused.detail) from None
        except EtcdError as exc:
            raise unavailable(exc) from None
        assert placed.gpu is not None, "a VRAM placement names its GPU"
        if placed.local:
            return placed.gpu, placed.placement
        try:
            status, answer = await cluster.forward("POST", f"{placed.url}/api/leases",
                                                   {**doc, "node_id": placed.node, "gpu_id": placed.gpu},
                                                   placement=placed.placement)
        except httpx.TransportError:
            excluded.add(placed.node)
            last = f"node {placed.node} did not answer"
            continue
        finally:
            cluster.answered(placed.placement)
        lease = answer.get("lease") if isinstance(answer, dict) else None
        if status == 200 and isinstance(lease, dict) and "lease_id" in lease:
            cluster.remember(str(lease["lease_id"]), placed.node, placed.url)
            return JSONResponse(answer)
        if status == 503 and pin is None:  # taken meanwhile on that node: try the next best
            excluded.add(placed.node)
            last = f"node {placed.node}: {answer.get('detail') if isinstance(answer, dict) else status}"
            continue
        return JSONResponse(answer, status_code=status)
    raise HTTPException(503, f"Insufficient VRAM — {mb} MB: the nodes chosen did not grant it ({last}); retry")


async def forward_lease(ctx: ApiContext, request: Request, method: str, lease_id: str, suffix: str = "",
                        body: Any = None, *, path: str | None = None) -> Response | None:
    """The answer of the node that holds ``lease_id`` when another one does; None when we should answer."""
    if ctx.cluster is None or forwarded(request):
        return None
    try:
        owner = await ctx.cluster.lease_owner(lease_id)
    except EtcdError as exc:
        raise unavailable(exc) from None
    if owner is None or owner[0] == ctx.cluster.node:
        return None
    try:
        target = path if path is not None else f"/v1/leases/{lease_id}{suffix}"
        status, answer = await ctx.cluster.forward(method, f"{owner[1]}{target}", body)
        if method == "DELETE" and status in (200, 404):
            ctx.cluster.forget(lease_id)
    except httpx.TransportError:
        raise HTTPException(404, f"lease {lease_id!r} is held by node {owner[0]}, which does not answer; "
                                 "ask for a new one") from None
    return JSONResponse(answer, status_code=status)


router = APIRouter()


@router.get("/v1/cluster", tags=["cluster"])
async def cluster_view(request: Request) -> dict[str, Any]:
    """Cluster mode: the live nodes (advertised URL, GPUs reserved/free, what runs), where each service runs,
    leases by node."""
    ctx: ApiContext = request.app.state.context
    cluster = cluster_of(ctx)
    try:
        return await cluster.overview()
    except EtcdError as exc:
        raise unavailable(exc) from None
