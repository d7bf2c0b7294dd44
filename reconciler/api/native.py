"""The native API, ``/v1``: leases, status, plan, events; and ``/metrics`` (the operator's verbs: :mod:`.services`).

Errors are ``{"detail": "…"}`` with 404 (unknown service or lease), 409 (a
restart of a service with nothing of ours running), 422 (a
body that does not validate: ``detail`` lists each problem with its
location), 429 (the service's queue is full), 503 (not granted within
``wait_s``: ``detail`` is the plan's reason; :mod:`.refusals` maps each
refusal to its code). See :mod:`reconciler.runtime.leasing` for what a lease
request does.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from reconciler.api import cluster, events
from reconciler.api.bodies import TextRoute
from reconciler.api.context import ApiContext, context, disconnected
from reconciler.api.metrics import CONTENT_TYPE
from reconciler.api.models import (
    LeaseOut,
    LeaseRequest,
    Problem,
    Released,
    RenewRequest,
    Status,
)
from reconciler.api.refusals import http_error
from reconciler.api.status import build_status, service_url
from reconciler.cluster.node import PLACEMENT, ClusterNode
from reconciler.core.clock import iso_utc
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Lease
from reconciler.core.world import lease_active
from reconciler.errors import CallerGone, LeaseRefused

router = APIRouter(route_class=TextRoute)
Ctx = Annotated[ApiContext, Depends(context)]
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it

_LEASE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem}, 429: {"model": Problem}, 503: {"model": Problem},
}


def lease_out(lease: Lease, profile: Profile, cluster: ClusterNode | None = None) -> LeaseOut:
    """A lease as answered; in cluster mode its URL is the node's advertised host, and it names the node."""
    spec = profile.services.get(lease.service) if lease.kind == "service" else None
    url = service_url(spec) if spec is not None else None
    if cluster is not None and spec is not None:
        url = cluster.service_url(spec.probe_port)
    return LeaseOut(
        id=lease.id, service=lease.service, holder=lease.holder, kind=lease.kind,
        url=url, gpu=lease.gpu, node=cluster.node if cluster is not None else None,
        mb=lease.mb or (spec.max_mb if spec is not None else 0), model=lease.model,
        expires_at=iso_utc(lease.expires_at) if lease.expires_at else None,
    )


@router.post("/v1/leases", response_model=LeaseOut, responses=_LEASE_ERRORS, tags=["leases"])
async def create_lease(body: LeaseRequest, request: Request, ctx: Ctx) -> LeaseOut | Response:
    """Lease a service: at once when a compatible instance has room, else after the reconciler starts one.
    A request without a ``holder`` is named after the client's address (``client 127.0.0.1:53422``). In a
    cluster, on the node placement chooses (:mod:`reconciler.api.cluster`)."""
    if not body.holder.strip():
        peer = request.client
        body = body.model_copy(update={"holder": f"client {peer.host}:{peer.port}" if peer else "client unknown"})
    placement = request.headers.get(PLACEMENT)
    if ctx.cluster is not None and not cluster.forwarded(request):
        where = await cluster.place(body, ctx)
        if isinstance(where, Response):
            return where
        placement = where[2]
    try:
        granted = await ctx.leasing.lease(body.to_request(), disconnected=lambda: disconnected(request))
    except LeaseRefused as refused:
        raise http_error(refused) from None
    except CallerGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if ctx.cluster is not None and placement is not None:
            ctx.cluster.answered(placement)
    return lease_out(granted.lease, ctx.profile(), ctx.cluster)


@router.get("/v1/leases", tags=["leases"])
async def list_leases(ctx: Ctx) -> dict[str, list[LeaseOut]]:
    profile = ctx.profile()
    return {"leases": [lease_out(lease, profile, ctx.cluster) for lease in ctx.runtime.ledger.leases()]}


@router.get("/v1/leases/{lease_id}", response_model=LeaseOut, responses={404: {"model": Problem}}, tags=["leases"])
async def get_lease(lease_id: str, request: Request, ctx: Ctx) -> LeaseOut | Response:
    lease = ctx.leasing.lease_by_id(lease_id)
    if lease is None and (elsewhere := await cluster.forward_lease(ctx, request, "GET", lease_id)) is not None:
        return elsewhere
    if lease is None:
        raise HTTPException(404, f"no lease {lease_id!r} (it expired, was released, or never existed)")
    return lease_out(lease, ctx.profile(), ctx.cluster)


@router.post("/v1/leases/{lease_id}/renew", response_model=LeaseOut, responses={404: {"model": Problem}},
             tags=["leases"])
async def renew_lease(lease_id: str, request: Request, ctx: Ctx,
                      body: RenewRequest | None = None) -> LeaseOut | Response:
    """The lease now ends ``ttl_s`` (default 300) from now; 404 once it expired (even before a pass released it:
    its slot may be someone else's by now)."""
    held, now = ctx.leasing.lease_by_id(lease_id), ctx.runtime.clock.now()
    if held is None and (elsewhere := await cluster.forward_lease(
            ctx, request, "POST", lease_id, "/renew", body.model_dump() if body else None)) is not None:
        return elsewhere
    if held is not None and not lease_active(held, now):
        raise HTTPException(404, f"lease {lease_id!r} expired at {iso_utc(held.expires_at or now)}; "
                                 "ask for a new one (POST /v1/leases)")
    lease = ctx.leasing.renew(lease_id, (body or RenewRequest()).ttl_s)
    if lease is None:
        raise HTTPException(404, f"no lease {lease_id!r} (it expired, was released, or never existed)")
    if ctx.cluster is not None:
        ctx.cluster.touch()
    return lease_out(lease, ctx.profile(), ctx.cluster)


@router.delete("/v1/leases/{lease_id}", response_model=Released, responses={404: {"model": Problem}},
               tags=["leases"])
async def release_lease(lease_id: str, request: Request, ctx: Ctx) -> Released | Response:
    lease = await ctx.leasing.release_durably(lease_id)
    if lease is None and (elsewhere := await cluster.forward_lease(ctx, request, "DELETE", lease_id)) is not None:
        return elsewhere
    if lease is None:
        raise HTTPException(404, f"no lease {lease_id!r} (it expired, was released, or never existed)")
    return Released(id=lease.id)


@router.get("/v1/status", response_model=Status, tags=["status"])
async def status(ctx: Ctx) -> Status:
    """GPUs, services, instances, leases, waiting demands with reasons, the plan, conditions."""
    status = build_status(ctx.runtime, ctx.profile())
    if ctx.cluster is not None:
        status.cluster = ctx.cluster.cluster
    return status


@router.get("/v1/plan", responses={503: {"model": Problem}}, tags=["status"])
async def plan(ctx: Ctx) -> dict[str, Any]:
    """The last pass's plan, as ``reconciler plan --format json`` prints it."""
    last = ctx.runtime.last_pass()
    if last is None:
        raise HTTPException(503, "no pass has planned yet; retry in a moment")
    return last.plan.to_json_dict()


@router.get("/v1/events", tags=["status"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def event_stream(
    request: Request, ctx: Ctx,
    since: Annotated[int | None, Query(ge=0, le=events.MAX_EVENT_ID,
                                       description="Replay stored events after this id first.")] = None,
    tail: Annotated[int | None, Query(ge=0, le=events.REPLAY_LIMIT,
                                      description="With neither `since` nor Last-Event-ID: replay the last "
                                      "(up to) N stored events first (the dashboard asks for 200 on load).")] = None,
) -> StreamingResponse:
    """Server-sent events: ``event: <kind>``, ``data: <JSON>``, ``id: <n>`` for stored events."""
    if since is None:
        since = events.last_event_id(request.headers.get("last-event-id"))
    if since is None and tail:
        ctx.runtime.events.flush()  # lease events are recorded in batches: count them in
        since = max(0, ctx.runtime.store.last_event_id() - tail)
    body = events.stream(ctx.runtime.events, ctx.runtime.store, since, ctx.closing)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/metrics", tags=["status"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(ctx: Ctx) -> Response:
    """Prometheus text format."""
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
