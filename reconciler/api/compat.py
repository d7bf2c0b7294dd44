"""cf-orch compatible routes, ``/api/...``: applications written against cf-orch's client work unchanged.

Same paths, bodies, answers and status codes as cf-orch's coordinator (its
error bodies too: ``{"detail": ...}``), but backed by the real reconciler:

* ``POST /api/leases`` grants a *VRAM lease* (``kind: vram``) of ``mb`` on
  ``gpu_id`` only when that much is free now, and the planner counts it as a
  reservation, so it blocks competing starts until released or expired.
  ``ttl_s`` 0 = until released. ``expires_at`` is seconds since the epoch,
  0.0 for none (as cf-orch writes it). ``priority`` is echoed back; it does
  not evict anything (and is forgotten when the server restarts: 2).
* ``POST /api/services/{svc}/allocate`` is a service lease through the same
  path as ``POST /v1/leases`` (each candidate must be a model name, as a
  lease's ``model``: a 422 names the one that is not); the candidates are
  tried in order; one the
  reconciler cannot grant now (the plan leaves it pending, or its start is
  backing off) falls through to the next, and when none is left the answer is
  503 with each candidate's reason, at once, as cf-orch answers "no
  capacity". A candidate the plan starts is waited for (up to 110 s; cf-orch's
  client gives up at 120). ``warm``: an instance was already running and
  compatible; ``started``: the reverse.
* ``node_id`` is this reconciler's node name (``--node``, default ``local``);
  ``agent_url`` is this server's URL; ``last_heartbeat`` the last observation.
  In cluster mode (``--etcd``) ``GET /api/nodes`` lists every live node of the
  cluster (``agent_url``: its advertised API), from etcd. ``allocate`` is
  placed across the cluster candidate by candidate (the chosen node answers,
  with its ``node_id`` and URL; releasing it at any node is forwarded to it).
  ``POST /api/leases`` (VRAM) is placed across the cluster too when its ``node_id`` is ``"*"`` (any
  node; ``gpu_id`` may then be left out: any GPU): the node and GPU with the most free MB now, through
  the same placement transaction; the answer's ``node_id`` and ``gpu_id`` name where it was granted.
  A ``node_id`` naming another live node pins the lease there (forwarded to it); this node's own name
  keeps it here, as on one machine. ``DELETE /api/leases/{id}`` works at any node.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from reconciler.api import cluster
from reconciler.api.bodies import TextRoute
from reconciler.api.cluster import unavailable
from reconciler.api.context import ApiContext, context, disconnected
from reconciler.api.models import MAX_TTL_S, ModelName, Problem
from reconciler.api.native import CLIENT_CLOSED
from reconciler.api.refusals import http_error, status_of
from reconciler.api.status import service_url
from reconciler.cluster.etcd import EtcdError
from reconciler.cluster.node import PLACEMENT, ClusterNode
from reconciler.core.snapshot import Lease
from reconciler.core.world import World
from reconciler.errors import CallerGone, LeaseRefused
from reconciler.runtime.leasing import LeaseRequest

router = APIRouter(prefix="/api", tags=["cf-orch"], route_class=TextRoute)
Ctx = Annotated[ApiContext, Depends(context)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
ALLOCATE_WAIT_S = 110.0  # cf-orch's client gives up after 120 s


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # as cf-orch's models: extra keys ignored


class VramLeaseRequest(_Body):
    node_id: Name
    gpu_id: int | None = Field(None, ge=0, le=1024)  # required but with node_id "*" in a cluster
    mb: int = Field(gt=0, le=16 * 1024 * 1024)
    service: Name
    priority: int = Field(2, ge=-1_000_000, le=1_000_000)
    ttl_s: float = Field(0.0, ge=0, le=MAX_TTL_S)


class AllocateRequest(_Body):
    model_candidates: list[ModelName] = Field(default_factory=list, max_length=64)
    gpu_id: int | None = Field(None, ge=0, le=1024)
    params: dict[str, str] = Field(default_factory=dict)
    ttl_s: float = Field(3600.0, gt=0, le=MAX_TTL_S)
    caller: Annotated[str, StringConstraints(max_length=200)] = ""


def _epoch(lease: Lease) -> float:
    return lease.expires_at.timestamp() if lease.expires_at else 0.0


def _vram_lease(lease: Lease, ctx: ApiContext) -> dict[str, Any]:
    return {
        "lease_id": lease.id, "node_id": ctx.node, "gpu_id": lease.gpu, "mb_granted": lease.mb,
        "holder_service": lease.service, "priority": ctx.leasing.vram_priority.get(lease.id, 2),
        "expires_at": _epoch(lease),
    }


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/nodes")
async def nodes(ctx: Ctx) -> dict[str, Any]:
    if ctx.cluster is not None:  # cluster mode: every live node, as the cluster view has it
        return await cluster_nodes(ctx.cluster)
    last = ctx.runtime.last_pass()
    if last is None:
        return {"nodes": [{"node_id": ctx.node, "agent_url": ctx.base_url, "last_heartbeat": 0.0, "gpus": []}]}
    snapshot = last.snapshot
    free = ctx.leasing.free_mb()
    return {"nodes": [{
        "node_id": snapshot.node, "agent_url": ctx.base_url, "last_heartbeat": snapshot.now.timestamp(),
        "gpus": [{"gpu_id": g.index, "name": g.name, "vram_total_mb": g.total_mb, "vram_used_mb": g.used_mb,
                  "vram_free_mb": free.get(g.index, 0)} for g in snapshot.gpus],
    }]}


async def cluster_nodes(cluster: ClusterNode) -> dict[str, Any]:
    try:
        view = await cluster.overview()
    except EtcdError as exc:
        raise unavailable(exc) from None
    out = []
    for node in view["nodes"]:
        observed = node.get("observed_at")
        out.append({
            "node_id": node["node"], "agent_url": node.get("url"), "alive": node.get("alive", False),
            "last_heartbeat": datetime.fromisoformat(observed.replace("Z", "+00:00")).timestamp() if observed else 0.0,
            "gpus": [{"gpu_id": g["index"], "name": g.get("name", ""), "vram_total_mb": g["total_mb"],
                      "vram_used_mb": g.get("used_mb", 0), "vram_free_mb": g["free_mb"]} for g in node["gpus"]],
        })
    return {"nodes": out}


@router.get("/leases")
async def leases(ctx: Ctx) -> dict[str, Any]:
    return {"leases": [_vram_lease(lease, ctx) for lease in ctx.runtime.ledger.leases() if lease.kind == "vram"]}


@router.post("/leases", response_model=None, responses={422: {"model": Problem}, 503: {"model": Problem}})
async def request_lease(body: VramLeaseRequest, request: Request, ctx: Ctx) -> dict[str, Any] | Response:
    gpu, placement = body.gpu_id, request.headers.get(PLACEMENT)
    if ctx.cluster is not None and not cluster.forwarded(request) and body.node_id != ctx.node:
        pin = None if body.node_id == cluster.ANYWHERE else body.node_id  # placed across the cluster
        placed = await cluster.vram_on(ctx, body.model_dump(), body.mb, gpu, pin)
        if isinstance(placed, Response):
            return placed
        gpu, placement = placed
    elif body.node_id != ctx.node:
        anywhere = " (or \"*\" in a cluster)" if ctx.cluster is not None else ""
        raise HTTPException(422, f"Unknown node_id {body.node_id!r} — this reconciler is node {ctx.node!r}"
                                 f"{anywhere}")
    if gpu is None:
        raise HTTPException(422, "gpu_id is required (in a cluster, node_id \"*\" places the lease on any GPU "
                                 "of any node)")
    try:
        lease = await ctx.leasing.vram_lease(gpu, body.mb, body.service, body.priority, body.ttl_s)
    except LeaseRefused as refused:
        raise http_error(refused) from None
    finally:
        if ctx.cluster is not None and placement is not None:
            ctx.cluster.answered(placement)
    return {"lease": _vram_lease(lease, ctx)}


@router.delete("/leases/{lease_id}", response_model=None, responses={404: {"model": Problem}})
async def release_lease(lease_id: str, request: Request, ctx: Ctx) -> dict[str, Any] | Response:
    lease = ctx.leasing.lease_by_id(lease_id)
    if lease is None and (elsewhere := await cluster.forward_lease(
            ctx, request, "DELETE", lease_id, path=f"/api/leases/{lease_id}")) is not None:
        return elsewhere
    if lease is None or lease.kind != "vram" or await ctx.leasing.release_durably(lease_id) is None:
        raise HTTPException(404, f"Lease {lease_id!r} not found")
    return {"released": True, "lease_id": lease_id}


@router.post("/services/{service}/allocate", response_model=None,  # untyped JSON, as cf-orch has it
             responses={422: {"model": Problem}, 503: {"model": Problem}})
async def allocate(service: str, body: AllocateRequest, request: Request, ctx: Ctx) -> dict[str, Any] | Response:
    if not body.model_candidates:
        raise HTTPException(422, "model_candidates must be non-empty")
    placement = request.headers.get(PLACEMENT)
    across = ctx.cluster is not None and not cluster.forwarded(request)  # placed across the cluster
    if service not in ctx.profile().services and not across:
        raise HTTPException(422, f"Unknown service {service!r} — not in profile {ctx.profile().name!r}")
    reasons = []
    for model in body.model_candidates:
        if across:
            elsewhere = await cluster.allocate_on(ctx, service, model, body.model_dump(), ALLOCATE_WAIT_S)
            if isinstance(elsewhere, Response):
                return elsewhere
            if isinstance(elsewhere, str):
                reasons.append(f"{model}: {elsewhere}")
                continue
        lease_request = LeaseRequest(service=service, holder=body.caller, model=model, ttl_s=body.ttl_s,
                                     gpu=body.gpu_id, wait_s=ALLOCATE_WAIT_S)
        try:
            granted = await ctx.leasing.lease(lease_request, disconnected=lambda: disconnected(request),
                                              fall_through=True)
        except LeaseRefused as refused:
            if status_of(refused) in (404, 422):
                raise HTTPException(422, refused.detail) from None
            reasons.append(f"{model}: {refused.detail}")
            continue
        except CallerGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            if ctx.cluster is not None and placement is not None:
                ctx.cluster.answered(placement)
        lease = granted.lease
        spec = ctx.profile().services.get(service)
        return {
            "allocation_id": lease.id, "service": service, "node_id": ctx.node, "gpu_id": lease.gpu,
            "model": lease.model,
            "url": ctx.cluster.service_url(spec.probe_port if spec else None) if ctx.cluster else service_url(spec),
            "started": not granted.warm, "warm": granted.warm,
        }
    raise HTTPException(503, f"All model candidates exhausted for {service!r}: " + "; ".join(reasons))


@router.delete("/services/{service}/allocations/{allocation_id}", response_model=None,
                responses={404: {"model": Problem}})
async def release_allocation(service: str, allocation_id: str, request: Request,
                             ctx: Ctx) -> dict[str, Any] | Response:
    lease = ctx.leasing.lease_by_id(allocation_id)
    if lease is None and (elsewhere := await cluster.forward_lease(
            ctx, request, "DELETE", allocation_id,
            path=f"/api/services/{service}/allocations/{allocation_id}")) is not None:
        return elsewhere
    if lease is None or lease.kind != "service" or lease.service != service:
        raise HTTPException(404, f"Allocation {allocation_id!r} not found for service {service!r}")
    if await ctx.leasing.release_durably(allocation_id) is None:
        raise HTTPException(404, f"Allocation {allocation_id!r} not found")
    return {"released": True, "allocation_id": allocation_id}


def _instances(ctx: ApiContext, service: str | None = None) -> list[dict[str, Any]]:
    profile, last = ctx.profile(), ctx.runtime.last_pass()
    world = World(profile, last.snapshot) if last is not None else None
    out = []
    for instance in ctx.runtime.store.instances():
        if service is not None and instance.service != service:
            continue
        healthy = world is not None and world.healthy(instance.service)
        state = "unhealthy" if instance.state == "running" and not healthy else instance.state
        out.append({
            "service": instance.service, "node_id": ctx.node, "gpu_id": instance.gpu, "state": state,
            "model": instance.model, "url": service_url(profile.services.get(instance.service)),
            "idle_since": idle.timestamp() if (idle := ctx.runtime.ledger.idle_since(instance)) else None,
        })
    return out


@router.get("/services/{service}/status", responses={404: {"model": Problem}})
async def service_status(service: str, ctx: Ctx) -> dict[str, Any]:
    profile = ctx.profile()
    if service not in profile.services:
        raise HTTPException(404, f"Unknown service {service!r} — not in profile {profile.name!r}")
    url = service_url(profile.services[service])
    allocations = [{
        "allocation_id": lease.id, "node_id": ctx.node, "gpu_id": lease.gpu, "model": lease.model,
        "caller": lease.holder, "url": url, "expires_at": _epoch(lease),
    } for lease in ctx.runtime.ledger.leases(service) if lease.kind == "service"]
    return {"service": service, "instances": _instances(ctx, service), "allocations": allocations}


@router.get("/services")
async def services(ctx: Ctx) -> dict[str, Any]:
    return {"services": [{k: v for k, v in i.items() if k != "idle_since"} for i in _instances(ctx)]}
