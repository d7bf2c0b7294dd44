"""Placement across nodes: what each node offers for a service, and which node a request goes to.

The rule is DESIGN §3's placement across GPUs, extended to nodes: **warm
first** (a running, healthy, compatible instance with a free lease slot,
anywhere; the one with the most free slots, then by name), **then where it
fits without eviction** (most free MB on the GPU it would go to), **then where
eviction costs least** (the eviction order of :mod:`reconciler.core.eviction`:
least important most-important member, fewest busy, fewest evicted, fewest
MB, names), then — when no node can start it now — a node where it runs
and the request may queue for a slot, and last a node that has just joined
and not yet observed its host (the request waits there for its first pass).
A request may pin a node.

We do not re-implement the rules to compare nodes. Each node asks its own
planner (:func:`reconciler.core.planner.plan`, pure) what it would do with
one more demand for each service of its profile — :func:`offers` — and
publishes the answer with its state: the tier (``warm``, ``fit``, ``evict``,
``queue``, ``none``), the free MB it would start on, the eviction's cost key,
or the pending reason. So a node with a 24 GB GPU and another with an 8 GB one
rank exactly as the two GPUs of one host would. Warm slots change with every
lease, offers with every pass: the warm count is recomputed at every publish
(cheap, from the store), the planner's offers once per pass.

:func:`rank` orders the nodes of a cluster view for a request; it is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from reconciler.core.compatibility import capacity, model_bound
from reconciler.core.planner import plan as make_plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Demand, Lease, Snapshot
from reconciler.core.world import World, lease_active

Tier = Literal["warm", "fit", "evict", "queue", "none"]
TIER_ORDER: dict[str, int] = {"warm": 0, "fit": 1, "evict": 2, "queue": 3, "none": 4}
PROBE = "cluster-probe"


@dataclass(frozen=True)
class Offer:
    tier: Tier
    free_mb: int = 0
    cost: tuple[Any, ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "free_mb": self.free_mb, "cost": list(self.cost), "reason": self.reason}


def offers(profile: Profile, snapshot: Snapshot, leases: list[Lease], demands: list[Demand],
           now: datetime) -> dict[str, Offer]:
    """Per service of ``profile``: what this node would do with one more demand for it, by its planner."""
    out: dict[str, Offer] = {}
    for name, spec in profile.services.items():
        if spec.managed is None:
            out[name] = Offer("none", reason=f"{name} is an unmanaged slot here")
            continue
        probe = Demand(id=PROBE, service=name, requested_at=now)
        current = snapshot.model_copy(update={"leases": list(leases), "demands": [*demands, probe],
                                              "now": max(now, snapshot.now)})
        plan = make_plan(profile, current)
        out[name] = _offer(plan.actions, plan.pending, plan.gpus, profile, leases, now, name)
    return out


def _offer(actions: list[Any], pending: list[Any], gpus: list[Any], profile: Profile, leases: list[Lease],
           now: datetime, name: str) -> Offer:
    by_id = {a.id: a for a in actions}
    grant = next((a for a in actions if a.kind == "lease" and a.lease == PROBE), None)
    if grant is None:
        reason = next((p.reason for p in pending if p.demand == PROBE), f"{name} cannot be served here now")
        runs = any(a.service == name for a in actions if a.kind not in ("stop", "evict"))
        return Offer("queue" if "leases held" in reason or runs else "none", reason=reason)
    needed: set[str] = set()
    todo = list(grant.requires)
    while todo:
        current = todo.pop()
        if current in needed or current not in by_id:
            continue
        needed.add(current)
        todo.extend(by_id[current].requires)
    started = [by_id[i] for i in needed if by_id[i].kind in ("start", "restart")]
    if not started:
        return Offer("warm")
    evicted = [by_id[i] for i in sorted(needed) if by_id[i].kind == "evict"]
    gpu = started[0].gpu
    free = next((g.free_mb for g in gpus if g.index == gpu), 0) if gpu is not None else 0
    if not evicted:
        return Offer("fit", free_mb=free)
    busy_services = {lease.service for lease in leases if lease_active(lease, now)}
    names = tuple(sorted(a.service for a in evicted))
    top = min(profile.services[s].priority if s in profile.services else 1_000_000 for s in names)
    cost = (-top, sum(1 for s in names if s in busy_services), len(names), sum(a.mb or 0 for a in evicted), names)
    return Offer("evict", free_mb=free, cost=cost)


def warm_slots(profile: Profile, world: World | None, leases: list[Lease], now: datetime) -> dict[str, int]:
    """Per running, healthy service: lease slots free now (max_concurrent − leases held)."""
    if world is None:
        return {}
    out: dict[str, int] = {}
    for name, instance in world.instances.items():
        spec = profile.services.get(name)
        if spec is None or spec.managed is None or instance.state != "running" or not world.healthy(name):
            continue
        held = sum(1 for lease in leases if lease.service == name and lease.kind == "service"
                   and lease_active(lease, now))
        out[name] = max(0, capacity(spec) - held)
    return out


def binds_model(profile: Profile, service: str) -> bool:
    spec = profile.services.get(service)
    return spec is not None and model_bound(spec)


@dataclass(frozen=True)
class Choice:
    node: str
    tier: Tier
    reason: str


def rank(states: dict[str, dict[str, Any]], service: str, model: str | None, *, pin: str | None = None,
         exclude: frozenset[str] = frozenset()) -> tuple[list[Choice], list[str]]:
    """The nodes that can take a request for ``service``, best first, and why each other one cannot.

    ``states``: node name → its published state (alive nodes only)."""
    keyed: list[tuple[tuple[Any, ...], Choice]] = []
    refusals: list[str] = []
    for node in sorted(states):
        if node in exclude or (pin is not None and node != pin):
            continue
        services = states[node].get("services", {})
        entry = services.get(service)
        if entry is None:
            refusals.append(f"{node}: no service {service!r} in its profile")
            continue
        offer = entry.get("offer")
        serving = entry.get("model")
        if offer is None:  # it joined before its first pass: it may take the request as a demand, last
            keyed.append(((4, node), Choice(node, "queue", "not observed yet: it waits for its first pass")))
            continue
        compatible = model is None or not entry.get("model_bound") or serving in (None, model)
        if entry.get("slots_free", 0) > 0 and compatible:
            keyed.append(((0, -int(entry["slots_free"]), node), Choice(node, "warm", "a free slot on a running "
                                                                                   "instance")))
            continue
        tier: Tier = offer.get("tier", "none")
        if tier == "warm":  # the offer is a pass old; the slot is gone: it may queue there
            tier = "queue"
        if tier == "fit":
            keyed.append(((1, -int(offer.get("free_mb", 0)), node), Choice(node, tier, "fits without eviction")))
        elif tier == "evict":
            cost = tuple(tuple(c) if isinstance(c, list) else c for c in offer.get("cost", ()))
            keyed.append(((2, cost, node), Choice(node, tier, "fits after evicting less important services")))
        elif tier == "queue" and compatible:
            keyed.append(((3, node), Choice(node, tier, offer.get("reason", "waits for a free slot"))))
        else:
            refusals.append(f"{node}: {offer.get('reason') or 'cannot serve it'}")
    if pin is not None and pin not in states:
        refusals.append(f"{pin}: not a live node of the cluster")
    keyed.sort(key=lambda item: item[0])
    return [choice for _, choice in keyed], refusals
