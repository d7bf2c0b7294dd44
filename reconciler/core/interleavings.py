"""Every order the executor may choose: the most memory a plan can hold on a GPU at any moment.

The executor (:mod:`reconciler.runtime.executor`) runs a plan's actions in any
order its ``requires`` edges allow, independent actions in parallel. A plan is
safe (invariant 4) only if *no* such order ever books more of a GPU than it
has — not just the listed order, and not just the end state.

Memory moves at two moments of an action on a GPU — on *each* of its GPUs,
for a service that spans several (``gpus``), every GPU counted on its own:

* when it is **dispatched**, a *consumer* takes memory: a ``start`` its
  ``mb``; a ``restart`` what its new ceiling needs beyond the reservation it
  already holds there (all of it on a GPU it moves to, when ``gpu_count``
  was edited); a ``lease`` on an unmanaged slot the slot's ``mb`` — once
  per slot and GPU, whichever of its leases comes first (a slot already
  booked before the plan takes nothing more);
* when it **completes**, a *freer* gives memory back: a ``stop`` or
  ``evict`` the reservation it names (``mb``; what its service booked on
  each GPU, for one spanning several); a ``restart`` whose new ceiling is
  smaller, the difference (all it held on a GPU it leaves).

An action is dispatched only once every action it requires has completed,
and completes only after it was dispatched. The adversary — the worst order —
dispatches as many consumers as it can while completing as few freers as it
must. Its best state is a *closure*: a set of dispatched actions together with
everything they (transitively) require completed. Finding the heaviest
closure — Σ taken − Σ given back — is a maximum-weight closure problem,
solved exactly by one minimum cut (networkx) per GPU, in polynomial time
however many orders there are. A slot's leases share one taking, which needs
what *all* of them require in common (a lower bound on what the first one
needs: the check errs on the side of "unsafe").

:func:`peak_extra` returns, per GPU, that heaviest weight: the most memory
beyond what is booked before the plan that any order holds at any moment.
The plan is safe when it is at most the GPU's headroom (what is free before
the plan; 0 when that is negative: a plan may never make an over-committed
GPU worse). The planner keeps its plans so (:meth:`Planner._order_memory
<reconciler.core.planner.Planner._order_memory>`); tests check it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from reconciler.core.plan import Action, Plan

if TYPE_CHECKING:
    import networkx as nx


class Moves:
    """Memory moves of a plan's actions, per GPU (an action on several GPUs moves memory on each).

    A plain class, not a dataclass: see :mod:`reconciler.core`.
    """

    def __init__(self) -> None:
        self.taken: dict[tuple[str, int], int] = {}  # (action id, gpu) → MB taken when dispatched
        self.given: dict[tuple[str, int], int] = {}  # (action id, gpu) → MB given back, completed
        self.slots: dict[tuple[str, int], list[str]] = {}  # (slot, gpu) → its lease actions
        self.slot_mb: dict[tuple[str, int], int] = {}  # (slot, gpu) → what its first lease takes

    def gives_on(self, action_id: str) -> list[int]:
        """The GPUs where ``action_id`` gives memory back, ascending."""
        return sorted(gpu for (moved, gpu), mb in self.given.items() if moved == action_id and mb > 0)


def memory_moves(actions: Sequence[Action], reserved: Mapping[tuple[str, int], int]) -> Moves:
    """What each action takes and gives back on each GPU; ``reserved[(service, gpu)]`` is booked before the plan.

    An action's ``mb`` counts on each of its GPUs. A stop or an evict gives back what its service
    booked there (its ``mb`` where nothing is known); a restart compares, GPU by GPU, what its
    service booked with its new ceiling on its (possibly other) GPUs.
    """
    moves = Moves()
    held: dict[str, list[int]] = {}  # service → GPUs it books before the plan
    for service, gpu in reserved:
        held.setdefault(service, []).append(gpu)
    for action in actions:
        mb, gpus = action.mb or 0, action.gpu_set
        if not gpus:
            continue
        if action.kind == "start" and mb:
            for gpu in gpus:
                moves.taken[(action.id, gpu)] = mb
        elif action.kind == "lease" and mb:
            for gpu in gpus:
                key = (action.service, gpu)
                if not reserved.get(key):
                    moves.slots.setdefault(key, []).append(action.id)
                    moves.slot_mb[key] = mb
        elif action.kind in ("stop", "evict") and mb:
            for gpu in gpus:
                moves.given[(action.id, gpu)] = reserved.get((action.service, gpu), mb) if len(gpus) > 1 else mb
        elif action.kind == "restart":
            for gpu in sorted(set(gpus) | set(held.get(action.service, []))):
                old = reserved.get((action.service, gpu), 0)
                new = mb if gpu in gpus else 0
                if new > old:
                    moves.taken[(action.id, gpu)] = new - old
                elif old > new:
                    moves.given[(action.id, gpu)] = old - new
    return moves


def peak_extra(plan: Plan, reserved: Mapping[tuple[str, int], int]) -> dict[int, int]:
    """GPU → the most MB beyond today's bookings that any order the plan allows holds at once."""
    moves = memory_moves(plan.actions, reserved)
    gpus = sorted({gpu for _id, gpu in (*moves.taken, *moves.given)} | {gpu for _slot, gpu in moves.slots})
    return {gpu: _heaviest_closure(plan.actions, moves, gpu) for gpu in gpus}


def _heaviest_closure(actions: Sequence[Action], moves: Moves, gpu: int) -> int:
    """Max over reachable states of Σ taken − Σ given back on ``gpu`` (≥ 0: the empty state)."""
    requires = {a.id: list(a.requires) for a in actions}
    weight: dict[object, int] = {}
    for action in actions:
        weight[("d", action.id)] = moves.taken.get((action.id, gpu), 0)  # dispatched
        weight[("c", action.id)] = -moves.given.get((action.id, gpu), 0)  # completed
    groups = {key: members for key, members in moves.slots.items() if key[1] == gpu}
    for key in groups:
        weight[("slot", key)] = moves.slot_mb[key]
    positive = sum(w for w in weight.values() if w > 0)
    if positive == 0:
        return 0
    import networkx as nx  # only where a plan is checked (tests, tools), never on the command line's path

    infinite = positive + 1
    graph: nx.DiGraph[object] = nx.DiGraph()
    source, sink = "source", "sink"
    graph.add_nodes_from([source, sink])
    for node, w in weight.items():
        if w > 0:
            graph.add_edge(source, node, capacity=w)
        elif w < 0:
            graph.add_edge(node, sink, capacity=-w)
    for action in actions:
        graph.add_edge(("c", action.id), ("d", action.id), capacity=infinite)  # completed ⇒ dispatched
        for required in requires[action.id]:
            if required in requires:  # dispatched ⇒ what it requires completed
                graph.add_edge(("d", action.id), ("c", required), capacity=infinite)
    for key, members in groups.items():
        common = set.intersection(*(set(requires[m]) for m in members))
        for required in common & requires.keys():  # the slot's taking needs what every lease of it needs
            graph.add_edge(("slot", key), ("c", required), capacity=infinite)
        for member in members:  # a lease dispatched ⇒ the slot taken
            graph.add_edge(("d", member), ("slot", key), capacity=infinite)
    cut, _ = nx.minimum_cut(graph, source, sink)
    return int(positive - cut)
