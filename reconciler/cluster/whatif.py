"""``reconciler plan --cluster``: what a profile change on one node would do across the cluster.

A node's profile decides what it offers the cluster: placement (:mod:`.placement`) ranks
the nodes by the offers each one publishes, computed by its own planner. So the cluster
side of a profile change is answered the same way, without touching anything: this
node's offers are computed again from its snapshot under the *new* profile
(:func:`.placement.offers`, :func:`.placement.warm_slots`, the same functions the node
publishes with), put in place of its published ones in the cluster view, and the
placement of a request for every service is ranked before and after (:func:`.placement.rank`,
pure). What comes out:

* the **local plan**, exactly what ``reconciler plan`` prints for the node;
* **withdrawn**: services this node offers now and would no longer (gone from the
  profile, an unmanaged slot now, or nothing it could do for one more request);
* **offered**: services that would become placeable here;
* **ended**: leases held on this node that the local plan would end (a ``release``
  of a lease that has not expired: its service left the profile, is held stopped,
  or is evicted) and placements in flight to this node for a service it would no
  longer offer — each with the node a new request from its holder would go to, or
  why no node could take it;
* **placement**: for every service of the cluster, the node (and tier) a new request
  would go to now and after the change; only the differences count as changes.

"Before" is the cluster as the node published it (its last pass); "after" is computed
from the snapshot given. A snapshot observed on the node just now agrees with what it
published, so an unchanged profile plans no cluster change (a test pins it).

Exit codes follow ``plan``'s (DESIGN §4): ``3`` when the local plan has anything pending
or a lease ended here could be placed on no node, else ``2`` when anything changes
(locally or across the cluster), else ``0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reconciler.cluster.placement import binds_model, offers, rank, warm_slots
from reconciler.core.accounting import world_now
from reconciler.core.compatibility import capacity
from reconciler.core.plan import Plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot
from reconciler.core.world import lease_active
from reconciler.errors import ReconcilerError


class ClusterViewError(ReconcilerError):
    """The cluster view cannot be used for this node (it is not a live node of it, or the view is malformed)."""


@dataclass(frozen=True)
class Offering:
    """A service this node starts or stops offering to the cluster, and why."""

    service: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "reason": self.reason}


@dataclass(frozen=True)
class Ended:
    """A lease held on this node, or a placement in flight to it, that the change ends; where it would go."""

    kind: str  # "lease" | "placement"
    id: str
    service: str
    holder: str | None  # a lease's holder; for a placement, the node that placed it
    why: str
    to: str | None  # the node a new request would be placed on; None when no node can take it
    tier: str | None
    refusals: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "service": self.service, "holder": self.holder, "why": self.why,
                "to": self.to, "tier": self.tier, "refusals": list(self.refusals)}


@dataclass(frozen=True)
class Where:
    """Where a new request for ``service`` goes now and after the change (``None``: no node can take it)."""

    service: str
    before: tuple[str, str] | None
    after: tuple[str, str] | None

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def to_json(self) -> dict[str, Any]:
        def doc(choice: tuple[str, str] | None) -> dict[str, str] | None:
            return None if choice is None else {"node": choice[0], "tier": choice[1]}

        return {"service": self.service, "before": doc(self.before), "after": doc(self.after),
                "changed": self.changed}


@dataclass(frozen=True)
class ClusterPlan:
    cluster: str
    node: str
    local: Plan
    withdrawn: list[Offering] = field(default_factory=list)
    offered: list[Offering] = field(default_factory=list)
    ended: list[Ended] = field(default_factory=list)
    placement: list[Where] = field(default_factory=list)

    @property
    def cluster_changes(self) -> bool:
        return bool(self.withdrawn or self.offered or self.ended or any(w.changed for w in self.placement))

    @property
    def stranded(self) -> list[Ended]:
        """Leases ended here that no node could take: what is wanted and cannot be reached."""
        return [e for e in self.ended if e.to is None]

    @property
    def exit_code(self) -> int:
        if self.local.pending or self.stranded:
            return 3
        return 2 if self.local.actions or self.cluster_changes else 0

    def to_json_dict(self) -> dict[str, Any]:
        return {"format_version": 1, "cluster": self.cluster, "node": self.node,
                "changes": self.local.changes or self.cluster_changes, "local": self.local.to_json_dict(),
                "withdrawn": [o.to_json() for o in self.withdrawn], "offered": [o.to_json() for o in self.offered],
                "ended": [e.to_json() for e in self.ended], "placement": [w.to_json() for w in self.placement]}


def placeable(entry: dict[str, Any] | None) -> bool:
    """Would :func:`.placement.rank` consider this node for the service (a node not yet observed: yes)?"""
    if entry is None:
        return False
    offer = entry.get("offer")
    return offer is None or offer.get("tier", "none") != "none"


def services_after(profile: Profile, snapshot: Snapshot, local: Plan) -> dict[str, dict[str, Any]]:
    """This node's ``services`` entry of its published state, as it would be under ``profile``: the fields
    :func:`.placement.rank` reads, by the functions :class:`.node.ClusterNode` publishes with."""
    now = snapshot.now
    world = world_now(profile, snapshot, snapshot.leases, now)
    slots = warm_slots(profile, world, snapshot.leases, now)
    offered = offers(profile, snapshot, snapshot.leases, snapshot.demands, now)
    gone = {a.service for a in local.actions if a.kind in ("stop", "evict", "restart")}
    instances = {i.service: i for i in snapshot.instances}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in profile.services.items():
        instance = instances.get(name)
        out[name] = {"priority": spec.priority, "max_mb": spec.max_mb, "capacity": capacity(spec),
                     "model_bound": binds_model(profile, name),
                     "running": instance is not None and instance.state == "running" and name not in gone,
                     "model": instance.model if instance is not None else None,
                     "slots_free": 0 if name in gone else slots.get(name, 0),
                     "offer": offered[name].to_json()}
    return out


def _first(states: dict[str, dict[str, Any]], service: str, model: str | None = None,
           exclude: frozenset[str] = frozenset()) -> tuple[tuple[str, str] | None, list[str]]:
    choices, refusals = rank(states, service, model, exclude=exclude)
    return ((choices[0].node, choices[0].tier) if choices else None), refusals


def cluster_plan(view: dict[str, Any], node: str, profile: Profile, snapshot: Snapshot, local: Plan) -> ClusterPlan:
    """What ``profile`` on ``node`` would do there (``local``, its plan from ``snapshot``) and across the cluster
    ``view`` (the document of ``GET /v1/cluster``)."""
    alive = {n["node"]: n for n in view.get("nodes", []) if n.get("alive")}
    if node not in alive:
        known = ", ".join(sorted(alive)) or "none"
        raise ClusterViewError(f"node {node!r} is not a live node of cluster {view.get('cluster')!r} (live: {known})")
    if any("services" not in n for n in alive.values()):
        raise ClusterViewError("the cluster view has no services per node: the node answering is older than this "
                               "command; upgrade it")
    before = {name: {"services": n["services"]} for name, n in alive.items()}
    mine = services_after(profile, snapshot, local)
    after = {**before, node: {"services": mine}}
    was = before[node]["services"]
    withdrawn = [Offering(name, "no longer in the profile" if name not in mine else
                          str(mine[name]["offer"].get("reason") or "it could not serve one more request here"))
                 for name in sorted(was) if placeable(was[name]) and not placeable(mine.get(name))]
    offered = [Offering(name, _offer_words(mine[name]["offer"])) for name in sorted(mine)
               if placeable(mine[name]) and not placeable(was.get(name))]
    ended: list[Ended] = []
    active = {lease.id: lease for lease in snapshot.leases if lease_active(lease, snapshot.now)}
    for action in local.actions:
        lease = active.get(action.lease or "") if action.kind == "release" else None
        if lease is None:
            continue
        to, refusals = _first(after, lease.service, lease.model, exclude=frozenset({node}))
        ended.append(Ended("lease", lease.id, lease.service, lease.holder or None, action.reason,
                           to[0] if to else None, to[1] if to else None, tuple(refusals)))
    for placement in view.get("placements", []):
        service = str(placement.get("service", ""))
        if placement.get("node") != node or placeable(mine.get(service)):
            continue
        to, refusals = _first(after, service, placement.get("model"), exclude=frozenset({node}))
        ended.append(Ended("placement", str(placement.get("id", "?")), service, placement.get("by"),
                           f"in flight to {node}, which would no longer offer {service}",
                           to[0] if to else None, to[1] if to else None, tuple(refusals)))
    names = sorted({s for state in (*before.values(), after[node]) for s in state["services"]})
    where = [Where(name, _first(before, name)[0], _first(after, name)[0]) for name in names]
    return ClusterPlan(str(view.get("cluster", "")), node, local, withdrawn, offered, ended, where)


def _offer_words(offer: dict[str, Any]) -> str:
    tier = offer.get("tier")
    if tier == "warm":
        return "a running instance here has a free slot"
    if tier == "fit":
        return f"it would start here without eviction ({offer.get('free_mb', 0)} MB free)"
    if tier == "evict":
        return "it would start here after evicting less important services"
    return str(offer.get("reason") or "it runs here; requests may queue for a slot")
