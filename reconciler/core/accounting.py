"""GPU memory between passes: the last observation, the last plan's effects, the leases held now.

Every view of free memory — the status document, a VRAM lease's check,
cf-orch's ``/api/nodes`` — derives it here, from the same three inputs. The
runtime observes the host once per pass; the API answers in between. What
it knows then: the last pass's snapshot (observed before that pass acted), the
plan that pass carried out, and the store's leases, which change at any
moment (a VRAM lease granted a millisecond ago must count at once). So:

* :func:`world_now` is the snapshot with the store's leases and the current
  time — the accounting behind ``GET /v1/status``;
* :func:`free_now` is that ``free`` less what the last plan's starts and
  restarts reserve (:func:`held_for`; every view says so: "1024 MB held
  for start:tts", :func:`held_notes`) (a start that pass carried out holds its reservation
  though the snapshot predates it; a failed one counts until the next pass
  sees it gone; a stop frees nothing until a pass sees the memory back) —
  what a VRAM lease may take. Conservative both ways, so reservations never
  exceed a GPU's total (invariant 4);
* :func:`headroom` is the same with VRAM-only leases left to the caller,
  who keeps their sum per GPU (the leasing service's hot path: no walk over
  a thousand leases per request);
* :func:`over_commits` is what that invariant looks like when it broke
  anyway — a crash in the middle of an eviction under an older version,
  foreign usage that grew, an edit that raised a ceiling: each GPU whose
  *booked* total (reservations plus foreign usage, DESIGN §3) is above its
  total, and by how much. It reads only an accounted world, never a plan —
  and the status document gives it the world the last pass planned from
  (its snapshot and *its* leases): a plan's starts and slot leases wait for
  its evictions, so adding them, or the store's leases granted since, to a
  snapshot that still shows the evicted would report an over-commit that
  never happened. An over-committed GPU is never "converged": the planner
  relieves it or says why it cannot (``relieve_over_commits``), and the
  status document shows it as a condition of its own (``over_committed``),
  with the figure per GPU (``GpuStatus.over_committed_mb``) that ``why``,
  the dashboard and the metrics read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from reconciler.core.plan import Plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Lease, Snapshot
from reconciler.core.world import World


def world_now(profile: Profile, snapshot: Snapshot, leases: list[Lease], now: datetime) -> World:
    """The accounted world of ``snapshot`` with ``leases`` in place of its own, at ``now``."""
    current = snapshot.model_copy(update={"leases": list(leases), "now": max(now, snapshot.now)})
    world = World(profile, current)
    world.account()
    return world


def free_now(
    profile: Profile, snapshot: Snapshot, plan: Plan | None, leases: list[Lease], now: datetime
) -> dict[int, int]:
    """GPU index → MB a new reservation may take now (see the module docstring)."""
    return {index: room.free() for index, room in headroom(profile, snapshot, [plan], leases, now).items()}


@dataclass(frozen=True)
class Headroom:
    """One GPU's room, with VRAM-only leases left out so that they can be added by the caller.

    ``free(v)`` is what :func:`free_now` says with VRAM leases of ``v`` MB in
    place: ``min(nvml_free, booked_free − v)`` (at least 0) less what planned
    starts hold. A VRAM lease's reservation is exactly its ``mb`` on its GPU
    and nothing else depends on it, so a running sum of them (the leasing
    service's ledger) gives the same figure as accounting them one by one.
    """

    nvml_free: int  # what NVML says is free
    booked_free: int  # total − Σ reservations − foreign usage, VRAM-only leases not included
    planned: int  # held for the starts and restarts of the plans given

    def free(self, vram_mb: int = 0) -> int:
        return max(0, max(0, min(self.nvml_free, self.booked_free - vram_mb)) - self.planned)


def headroom(
    profile: Profile, snapshot: Snapshot, plans: Sequence[Plan | None], leases: list[Lease], now: datetime
) -> dict[int, Headroom]:
    """GPU index → its :class:`Headroom` with ``leases`` and the starts of every plan in ``plans`` counted
    (a plan being carried out and the last one alike: conservative)."""
    world = world_now(profile, snapshot, leases, now)
    planned: dict[int, int] = {}
    for plan in plans:
        for index, mb in planned_reservations(world, plan).items():
            planned[index] = planned.get(index, 0) + mb
    return {index: Headroom(view.gpu.nvml_free_mb, view.total - view.reserved - view.foreign,
                            planned.get(index, 0))
            for index, view in world.gpus.items()}


def held_for(world: World, plan: Plan | None) -> dict[int, list[tuple[str, int]]]:
    """GPU index → [(action id, MB)]: what the plan's starts and restarts hold beyond what ``world`` counts.

    A plan is made from the snapshot it is carried out on, so its starts are
    not in that snapshot; its restarts may raise a reservation. Stops are
    ignored (memory counts until a pass sees it given back), and so are
    leases (the store's leases are already counted). A start held back by its
    backoff holds its memory too: it is still the plan, and the memory is
    kept for it rather than handed to a VRAM lease that would block it.
    """
    out: dict[int, list[tuple[str, int]]] = {}
    for action in plan.actions if plan is not None else ():
        if action.kind not in ("start", "restart") or not action.mb:
            continue
        for gpu in action.gpu_set:  # a service spanning several GPUs reserves its mb on each
            view = world.gpus.get(gpu)
            held = view.holders.get(action.service) if view is not None else None
            mb = action.mb - (held.reservation if held is not None else 0)
            if mb > 0:
                out.setdefault(gpu, []).append((action.id, mb))
    return out


def planned_reservations(world: World, plan: Plan | None) -> dict[int, int]:
    """GPU index → MB that the plan's starts and restarts reserve beyond what ``world`` counts (:func:`held_for`)."""
    return {gpu: sum(mb for _, mb in items) for gpu, items in held_for(world, plan).items()}


def held_notes(items: list[tuple[str, int]]) -> list[str]:
    """``["1024 MB held for start:tts"]``: how every view says where planned memory went."""
    return [f"{mb} MB held for {action}" for action, mb in items]


def free_explained(
    profile: Profile, snapshot: Snapshot, plan: Plan | None, leases: list[Lease], now: datetime, gpu: int
) -> tuple[int, list[str]]:
    """GPU ``gpu``'s free MB as :func:`free_now` counts it, and what the last plan holds there, in words."""
    world = world_now(profile, snapshot, leases, now)
    view = world.gpus.get(gpu)
    if view is None:
        return 0, []
    items = held_for(world, plan).get(gpu, [])
    return max(0, view.free - sum(mb for _, mb in items)), held_notes(items)


def freed_for_starts(world: World, plan: Plan | None) -> set[tuple[str, int]]:
    """(holder, GPU) pairs that the plan's starts and restarts wait to see freed: stops and evictions
    they require (the memory rule makes a start require every freer it counts on).

    A start in :func:`planned_reservations` can only have run once these finished, so a *display* of
    the GPU — the status document's bar — leaves them out where it counts the start; otherwise a
    stop-then-start shows both, above the total, until the next observation. (:func:`free_now`
    keeps counting them: what a VRAM lease may take stays conservative.)
    """
    if plan is None:
        return set()
    by_id = {action.id: action for action in plan.actions}
    gone: set[tuple[str, int]] = set()
    for action in plan.actions:
        if action.kind not in ("start", "restart") or not action.mb:
            continue
        for required in action.requires:
            freer = by_id.get(required)
            if freer is None or freer.kind not in ("stop", "evict"):
                continue
            for gpu in set(freer.gpu_set) & set(action.gpu_set):
                view = world.gpus.get(gpu)
                if view is not None and freer.service in view.holders:
                    gone.add((freer.service, gpu))
    return gone


@dataclass(frozen=True)
class OverCommit:
    """One GPU booked beyond its total: ``booked_mb`` (reservations + foreign usage) on ``total_mb``."""

    gpu: int
    total_mb: int
    booked_mb: int

    @property
    def over_mb(self) -> int:
        """How much must be freed for the GPU to fit again."""
        return self.booked_mb - self.total_mb

    def describe(self) -> str:
        return (f"GPU {self.gpu} is over-committed: {self.booked_mb} MB booked on {self.total_mb} MB, "
                f"{self.over_mb} MB too many")


def over_commits(world: World) -> list[OverCommit]:
    """The GPUs of an accounted ``world`` whose booked total is above their total, by index."""
    out = []
    for index in sorted(world.gpus):
        view = world.gpus[index]
        booked = view.reserved + view.foreign
        if booked > view.total:
            out.append(OverCommit(gpu=index, total_mb=view.total, booked_mb=booked))
    return out


def over_committed_mb(world: World) -> dict[int, int]:
    """GPU index → MB booked beyond its total, 0 where it fits: one figure per GPU, for a gauge."""
    over = {o.gpu: o.over_mb for o in over_commits(world)}
    return {index: over.get(index, 0) for index in sorted(world.gpus)}
