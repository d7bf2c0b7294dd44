"""Placement across nodes: what each node offers for a service, and which node a request goes to.

The rule is DESIGN §3's placement across GPUs, extended to nodes: **warm
first** (a running, healthy, compatible instance with a free lease slot,
anywhere; the one with the most free slots, then by name), **then where it
fits without eviction** (most free MB on the GPU it would go to), **then where
eviction costs least** (the eviction order of :mod:`reconciler.core.eviction`:
least important most-important member, fewest busy, fewest evicted, fewest
MB, names), then — when no node can start it now — a node where it runs
and the request may queue for a slot, then a node where it runs another model
(the request waits there until the instance is idle and switches it, as on
one machine), and last a node that has just joined and not yet observed its
host (the request waits there for its first pass). A request may pin a node.

Three rankings share the rule: :func:`rank` (a lease on a named service:
``POST /v1/leases``, cf-orch's ``allocate``), :func:`rank_model` (a gateway
request: each node scored on the service its own gateway routes the model
to — published with its state as ``models`` — so a model may be served by
differently named services on different nodes) and :func:`rank_vram` (cf-orch's
VRAM lease: the GPU with the most free MB, since such a lease starts and
evicts nothing).

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

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from reconciler.core.compatibility import capacity, model_bound
from reconciler.core.planner import plan as make_plan
from reconciler.core.profile import Profile
from reconciler.core.served import Route, lookup
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
    service: str = ""  # the service on that node (a gateway request: a model's service may differ by node)
    model: str | None = None  # the name that node's upstream knows the model by
    gpu: int | None = None  # a VRAM lease: the GPU it goes to


def _score(node: str, entry: dict[str, Any], model: str | None) -> tuple[tuple[Any, ...], Choice] | str:
    """One node's rank key and choice for a request on its service ``entry``, or why it cannot take it."""
    offer = entry.get("offer")
    serving = entry.get("model")
    if offer is None:  # it joined before its first pass: it may take the request as a demand, last
        return (5, node), Choice(node, "queue", "not observed yet: it waits for its first pass")
    compatible = model is None or not entry.get("model_bound") or serving in (None, model)
    if entry.get("slots_free", 0) > 0 and compatible:
        return (0, -int(entry["slots_free"]), node), Choice(node, "warm", "a free slot on a running instance")
    tier: Tier = offer.get("tier", "none")
    if tier == "warm":  # the offer is a pass old, or the instance runs another model: it may queue there
        tier = "queue"
    if tier == "fit":
        return (1, -int(offer.get("free_mb", 0)), node), Choice(node, tier, "fits without eviction")
    if tier == "evict":
        cost = tuple(tuple(c) if isinstance(c, list) else c for c in offer.get("cost", ()))
        return (2, cost, node), Choice(node, tier, "fits after evicting less important services")
    if tier == "queue" and compatible:
        return (3, node), Choice(node, tier, offer.get("reason", "waits for a free slot"))
    if tier == "queue":  # runs another model: the request waits there until the instance is idle, then switches
        return (4, node), Choice(node, tier, f"runs {serving}; switches to {model} once idle")
    return str(offer.get("reason") or "cannot serve it")


def rank(states: dict[str, dict[str, Any]], service: str, model: str | None, *, pin: str | None = None,
         exclude: frozenset[str] = frozenset()) -> tuple[list[Choice], list[str]]:
    """The nodes that can take a request for ``service``, best first, and why each other one cannot.

    ``states``: node name → its published state (alive nodes only)."""
    keyed: list[tuple[tuple[Any, ...], Choice]] = []
    refusals: list[str] = []
    for node in sorted(states):
        if node in exclude or (pin is not None and node != pin):
            continue
        entry = states[node].get("services", {}).get(service)
        if entry is None:
            refusals.append(f"{node}: no service {service!r} in its profile")
            continue
        scored = _score(node, entry, model)
        if isinstance(scored, str):
            refusals.append(f"{node}: {scored}")
        else:
            keyed.append((scored[0], replace(scored[1], service=service, model=model)))
    if pin is not None and pin not in states:
        refusals.append(f"{pin}: not a live node of the cluster")
    keyed.sort(key=lambda item: item[0])
    return [choice for _, choice in keyed], refusals


def route_of(state: dict[str, Any], asked: str) -> Route | None:
    """How a node's gateway routes the model name ``asked`` (its published ``models``), Ollama's tag rule
    included; None when it does not serve it or has no gateway."""
    if not state.get("gateway"):
        return None
    table = {name: Route(str(r["service"]), str(r["model"]), r.get("api", "openai"), bool(r.get("declared", True)))
             for name, r in (state.get("models") or {}).items()}
    return lookup(table, asked)


def rank_model(states: dict[str, dict[str, Any]], asked: str, *, pin: str | None = None,
               exclude: frozenset[str] = frozenset()) -> tuple[list[Choice], list[str]]:
    """The nodes whose gateway can take a request for the model ``asked``, best first (the rule of
    :func:`rank`, each node scored on the service that serves ``asked`` there), and why the others cannot."""
    keyed: list[tuple[tuple[Any, ...], Choice]] = []
    refusals: list[str] = []
    for node in sorted(states):
        if node in exclude or (pin is not None and node != pin):
            continue
        route = route_of(states[node], asked)
        if route is None:
            continue  # not served there: not a refusal worth naming
        entry = states[node].get("services", {}).get(route.service)
        if entry is None:
            continue
        scored = _score(node, entry, route.model)
        if isinstance(scored, str):
            refusals.append(f"{node} ({route.service}): {scored}")
        else:
            keyed.append((scored[0], replace(scored[1], service=route.service, model=route.model)))
    keyed.sort(key=lambda item: item[0])
    return [choice for _, choice in keyed], refusals


def rank_vram(reservations: dict[str, dict[str, Any]], mb: int, gpu: int | None, *, pin: str | None = None,
              exclude: frozenset[str] = frozenset()) -> tuple[list[Choice], list[str]]:
    """The (node, GPU) pairs with ``mb`` free now for a VRAM lease, most free MB first, and why the other
    nodes cannot take it. A VRAM lease starts nothing and evicts nothing (cf-orch's rule), so only the
    tier "fits without eviction" applies; ``gpu`` given: that GPU index only.

    ``reservations``: node name → its published ``reservations`` document (alive nodes only)."""
    keyed: list[tuple[tuple[Any, ...], Choice]] = []
    refusals: list[str] = []
    for node in sorted(reservations):
        if node in exclude or (pin is not None and node != pin):
            continue
        gpus = [g for g in reservations[node].get("gpus", []) if gpu is None or g.get("index") == gpu]
        if not gpus:
            refusals.append(f"{node}: no GPU {gpu}" if gpu is not None else f"{node}: no GPU observed yet")
            continue
        best = max(gpus, key=lambda g: (int(g.get("free_mb", 0)), -int(g.get("index", 0))))
        free = int(best.get("free_mb", 0))
        if free < mb:
            refusals.append(f"{node}: GPU {best.get('index')} has {free} MB free, {mb} MB requested")
            continue
        keyed.append(((-free, node), Choice(node, "fit", f"{free} MB free on GPU {best['index']}",
                                            gpu=int(best["index"]))))
    if pin is not None and pin not in reservations:
        refusals.append(f"{pin}: not a live node of the cluster")
    keyed.sort(key=lambda item: item[0])
    return [choice for _, choice in keyed], refusals
