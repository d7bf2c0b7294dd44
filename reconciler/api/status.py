"""The status document (``GET /v1/status``): what runs where, who holds what, what waits and why.

Made on request from three sources: the runtime's state, read now
(:meth:`~reconciler.runtime.Runtime.state`: instances from the store, leases
and demands from the ledger: a lease granted a moment ago shows at once; one whose time is up
but that no pass has released yet shows as ``state: "expired"`` with
``remaining_s: 0``, and is not counted as held); the last pass's
snapshot, for health and GPU memory (with the leases held now accounted, see
:mod:`reconciler.core.accounting`); and the last pass's plan, for the reasons. A GPU booked
beyond its total in the world that plan was made from is never "converged":
``gpus[].over_committed_mb`` and an ``over_committed`` condition say by how
much and what the plan does about it (issue 8.2). The model
gateway's traffic per model (``models``) is the runtime's
:class:`~reconciler.runtime.traffic.Traffic`. The shape is
:class:`reconciler.api.models.Status` (example in ``reconciler/api/README.md``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from reconciler.api.models import (
    BackoffStatus,
    Condition,
    DemandStatus,
    GpuStatus,
    InstanceStatus,
    LeaseStatus,
    ModelTraffic,
    PendingStatus,
    ServiceStatus,
    Status,
)
from reconciler.core.accounting import OverCommit, freed_for_starts, held_for, held_notes, over_commits, world_now
from reconciler.core.backoff import Backoff
from reconciler.core.clock import iso_utc
from reconciler.core.compatibility import capacity
from reconciler.core.dependencies import Dependencies
from reconciler.core.plan import Plan
from reconciler.core.profile import DockerSpec, Profile, Service
from reconciler.core.snapshot import Demand, Instance, Lease, Snapshot
from reconciler.core.wanted import held_closure
from reconciler.core.world import World, lease_active
from reconciler.runtime import Runtime


def service_url(spec: Service | None) -> str | None:
    """Where a service answers on this host: ``http://127.0.0.1:{host_port}`` (a container published on
    one address only: that address)."""
    return spec.base_url if spec is not None else None


def _iso(dt: datetime | None) -> str | None:
    return iso_utc(dt) if dt is not None else None


def _seconds(delta: float) -> float:
    return round(delta, 1)


def build_status(runtime: Runtime, profile: Profile) -> Status:
    store, now = runtime.store, runtime.clock.now()
    state = runtime.state()
    last = runtime.last_pass()
    snapshot, plan = (last.snapshot, last.plan) if last is not None else (None, None)
    world = world_now(profile, snapshot, state.leases, now) if snapshot is not None else None
    over = over_commits(planned_from(profile, snapshot)) if snapshot is not None else []
    backoffs = {name: store.get_backoff(name) for name in sorted(set(profile.services) | {
        i.service for i in state.instances})}
    active = [lease for lease in state.leases if lease_active(lease, now)]
    return Status(
        node=snapshot.node if snapshot is not None else runtime.node,
        profile=profile.name,
        observed_at=_iso(snapshot.now) if snapshot is not None else None,
        now=iso_utc(now),
        gpus=_gpus(world, plan, over),
        services=_services(profile, world, snapshot, backoffs, now),
        instances=[_instance(i, profile, world, active, backoffs, now) for i in state.instances],
        leases=[_lease(lease, now) for lease in state.leases],
        demands=[_demand(d, plan, now) for d in state.demands],
        pending=[PendingStatus(service=p.service, demand=p.demand, reason=p.reason) for p in plan.pending]
        if plan is not None else [],
        plan=plan.to_json_dict() if plan is not None else None,
        conditions=_conditions(plan, backoffs, snapshot is not None, over, runtime.profile_problem),
        models=models(runtime),
    )


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 2) if seconds is not None else None


def models(runtime: Runtime) -> list[ModelTraffic]:
    """The model gateway's traffic per model (:mod:`reconciler.runtime.traffic`)."""
    return [ModelTraffic(
        model=m.model, service=m.service, requests=m.requests, errors=m.errors, disconnected=m.disconnected,
        in_flight=m.in_flight, queued=m.queued, ttfb_p50_ms=_ms(m.ttfb.quantile(0.5)),
        ttfb_p99_ms=_ms(m.ttfb.quantile(0.99)), total_p50_ms=_ms(m.total.quantile(0.5)),
        total_p99_ms=_ms(m.total.quantile(0.99)), caused=dict(m.caused), proxied=dict(m.proxied),
    ) for m in runtime.traffic.models()]


def planned_from(profile: Profile, snapshot: Snapshot) -> World:
    """The world the last pass planned from: its snapshot, its leases. Where a GPU is over-committed is
    judged here, as the planner judged it — not with the store's leases now: a slot lease that pass
    granted after evicting for it would count beside the evicted instance the snapshot still shows."""
    world = World(profile, snapshot)
    world.account()
    return world


def _gpus(world: World | None, plan: Plan | None, over_commits: list[OverCommit]) -> list[GpuStatus]:
    """Each GPU's reservations by origin. The last pass's snapshot predates
    the starts that pass carried out, so their reservations are added from
    its plan (and said: ``held_for``), as a VRAM lease's check counts them
    (:func:`reconciler.core.accounting.free_now`) — and what those starts waited to see freed is left out
    (:func:`~reconciler.core.accounting.freed_for_starts`), so a stop-then-start never shows both, above
    the GPU's total. ``free_mb`` stays what a VRAM lease may take."""
    if world is None:
        return []
    held = held_for(world, plan)
    planned = {gpu: sum(mb for _, mb in items) for gpu, items in held.items()}
    gone = freed_for_starts(world, plan)  # a start counted above ran only once these were freed
    over = {o.gpu: o.over_mb for o in over_commits}
    out = []
    for index, view in world.gpus.items():
        by_origin = {"started": planned.get(index, 0), "adopted": 0, "slot": 0, "vram": 0}
        for key, holder in view.holders.items():
            if (key, index) not in gone:
                by_origin[holder.origin] = by_origin.get(holder.origin, 0) + holder.reservation
        out.append(GpuStatus(
            index=index, name=view.gpu.name, total_mb=view.total, reserved_started_mb=by_origin["started"],
            adopted_mb=by_origin["adopted"], leased_mb=by_origin["slot"] + by_origin["vram"],
            foreign_mb=view.foreign, free_mb=max(0, view.free - planned.get(index, 0)), used_mb=view.gpu.used_mb,
            held_for=held_notes(held.get(index, [])),
            services_mb={name: holder.reservation for name, holder in sorted(view.holders.items())
                         if holder.origin in ("started", "adopted") and (name, index) not in gone},
            over_committed_mb=over.get(index, 0),
        ))
    return out


def backoff_status(backoff: Backoff | None, now: datetime) -> BackoffStatus | None:
    """A service's failures as the views show them; None once there are none (or a healthy spell cleared them)."""
    if backoff is None or not backoff.failures:
        return None
    next_at = backoff.next_attempt_at if backoff.next_attempt_at is not None and backoff.next_attempt_at > now else None
    recovered = backoff.healthy_since is not None
    return BackoffStatus(
        failures=backoff.failures, last_error=backoff.last_error, stalled=backoff.stalled and not recovered,
        next_try_at=iso_utc(next_at, timespec="seconds") if next_at is not None else None,
        next_try_in_s=_seconds((next_at - now).total_seconds()) if next_at is not None else None,
        recovered=recovered,
    )


def _services(profile: Profile, world: World | None, snapshot: Snapshot | None, backoffs: dict[str, Backoff],
              now: datetime) -> list[ServiceStatus]:
    held = held_closure(world, Dependencies(profile.services)) if world is not None and snapshot is not None \
        and snapshot.held else {}
    out = []
    for name, spec in sorted(profile.services.items(), key=lambda kv: (kv[1].priority, kv[0])):
        kind: Literal["process", "docker", "unmanaged"] = (
            "unmanaged" if spec.managed is None else "docker" if isinstance(spec.managed, DockerSpec) else "process"
        )
        out.append(ServiceStatus(
            service=name, priority=spec.priority, max_mb=spec.max_mb, managed=kind, always_on=spec.always_on,
            max_concurrent=capacity(spec), url=service_url(spec),
            running=world is not None and name in world.instances, description=spec.description,
            held=held.get(name), backoff=backoff_status(backoffs.get(name), now),
        ))
    return out


def _instance(
    instance: Instance, profile: Profile, world: World | None, active: list[Lease], backoffs: dict[str, Backoff],
    now: datetime,
) -> InstanceStatus:
    spec = profile.services.get(instance.service)
    backoff = backoffs.get(instance.service)
    # an instance that has been healthy since its last failure shows neither the old error nor a stall
    failing = backoff is not None and (backoff.failures > 0 or backoff.stalled) and backoff.healthy_since is None
    return InstanceStatus(
        service=instance.service, state=instance.state,
        healthy=_healthy(instance, world),
        url=service_url(spec), gpu=instance.gpu, gpus=instance.gpus, origin=instance.origin, pid=instance.pid,
        model=instance.model,
        leases=sum(1 for lease in active if lease.service == instance.service and lease.kind == "service"),
        max_concurrent=capacity(spec) if spec is not None else 1,
        uptime_s=_seconds((now - instance.since).total_seconds()) if instance.since else None,
        priority=spec.priority if spec is not None else None, mb=_reservation(instance, world),
        last_error=backoff.last_error if failing and backoff is not None else None,
        stalled=bool(backoff and backoff.stalled and backoff.healthy_since is None),
    )


def _reservation(instance: Instance, world: World | None) -> int | None:
    """What the instance books on its (first) GPU; None when it is on none or not observed yet."""
    if world is None or instance.gpu is None or instance.gpu not in world.gpus:
        return None
    holder = world.gpus[instance.gpu].holders.get(instance.service)
    return holder.reservation if holder is not None else None


def _healthy(instance: Instance, world: World | None) -> bool:
    """The last probe's verdict; for an instance newer than the last observation, its start's health check."""
    running = instance.state == "running"  # the runtime marks a start running only once it answered healthy
    if world is None:
        return running
    seen = world.instances.get(instance.service)
    if seen is not None and seen.pid == instance.pid:
        return world.healthy(instance.service)
    dead = world.dead.get(instance.service)
    if dead is not None and dead.pid == instance.pid:
        return False
    return running


def _lease(lease: Lease, now: datetime) -> LeaseStatus:
    """A lease as the document shows it: an expired one (not yet released by a pass) says so, with 0 s left."""
    active = lease_active(lease, now)
    remaining = max(0.0, (lease.expires_at - now).total_seconds()) if lease.expires_at else None
    return LeaseStatus(
        id=lease.id, kind=lease.kind, service=lease.service, holder=lease.holder, gpu=lease.gpu, mb=lease.mb,
        model=lease.model, expires_at=_iso(lease.expires_at), state="active" if active else "expired",
        remaining_s=(_seconds(remaining) if active else 0.0) if remaining is not None else None,
    )


def demand_reason(demand_id: str, plan: Plan | None) -> str:
    """Why a demand waits, from the plan: its pending reason, or the lease the plan has for it."""
    verdict = plan.verdict(demand_id) if plan is not None else None
    if verdict is None:
        return "waiting for the next pass to plan it"
    return verdict.reason if verdict.state == "pending" else f"planned: {verdict.reason}"


def _demand(demand: Demand, plan: Plan | None, now: datetime) -> DemandStatus:
    waited = (now - demand.requested_at).total_seconds() if demand.requested_at else None
    return DemandStatus(
        id=demand.id, service=demand.service, holder=demand.holder, model=demand.model,
        requested_at=_iso(demand.requested_at), waited_s=_seconds(waited) if waited is not None else None,
        reason=demand_reason(demand.id, plan),
    )


def _conditions(
    plan: Plan | None, backoffs: dict[str, Backoff], observed: bool, over: list[OverCommit],
    profile_problem: str | None = None,
) -> list[Condition]:
    """``converged`` is ok only when the plan has nothing to do *and* no GPU is booked beyond its total."""
    out = []
    if profile_problem is not None:  # first: the header says it until a good save
        out.append(Condition(type="profile", ok=False, message=profile_problem))
    if not observed or plan is None:
        out.append(Condition(type="observed", ok=False, message="no pass has observed the host yet"))
    else:
        converged = not plan.actions and not plan.pending and not over
        bits = [f"{len(plan.actions)} action(s)" if plan.actions else "",
                f"{len(plan.pending)} pending" if plan.pending else "",
                f"GPU {', '.join(str(o.gpu) for o in over)} over-committed" if over else ""]
        out.append(Condition(type="converged", ok=converged,
                             message="converged: nothing to do" if converged else ", ".join(b for b in bits if b)))
        for item in plan.pending:
            out.append(Condition(type="pending", ok=False, service=item.service, message=item.reason))
    for commit in over:
        out.append(Condition(type="over_committed", ok=False, gpu=commit.gpu,
                             message=f"{commit.describe()}; {_relief(commit.gpu, plan)}"))
    for name, backoff in backoffs.items():
        if backoff.stalled and backoff.healthy_since is None:
            message = f"{backoff.failures} failures in a row: {backoff.last_error or 'unknown error'}"
            out.append(Condition(type="stalled", ok=False, service=name, message=message))
    return out


def _relief(gpu: int, plan: Plan | None) -> str:
    """What the last plan does about an over-committed GPU: the evictions on it, or why it cannot."""
    if plan is None:
        return "no plan yet"
    evicted = [a.service for a in plan.actions if a.kind in ("evict", "stop") and gpu in a.gpu_set]
    waits = [p.reason for p in plan.pending if p.service == f"GPU {gpu}"]
    if evicted:
        return f"the plan frees memory there: {', '.join(evicted)} stop{'s' if len(evicted) == 1 else ''}"
    if waits:  # the planner's "over-committed: … MB must be freed; <why>": the numbers are said already
        return "nothing is evicted: " + waits[0].split(" must be freed; ", 1)[-1]
    return "the next pass relieves it"
