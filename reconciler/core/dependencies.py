"""The ``depends_on`` graph: a DAG over service names, and orders that respect a DAG.

An edge ``dep → service`` means "start ``dep`` first, stop ``service`` first".
:class:`Dependencies` answers the planner's questions about it — what a
service needs, what needs it, an order with dependencies first — each
computed once per plan. :func:`topological_order` orders any DAG (the plan's
actions too) the same way every time: of the nodes whose predecessors are
all placed, always the smallest by a key (a lexicographical topological
sort), with the standard library's :mod:`graphlib` keeping the books.

A cycle is a validation error that names it (:func:`find_cycle`, the one
place networkx is asked, and only when :mod:`graphlib` has found there is a
cycle: the command line does not pay for importing it otherwise).
"""

from __future__ import annotations

import graphlib
import heapq
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

from reconciler.core.profile import Service

N = TypeVar("N", bound=Hashable)


def topological_order(nodes: Iterable[N], edges: Iterable[tuple[N, N]], key: Callable[[N], Any]) -> list[N]:
    """Every node, each after its predecessors (edges run predecessor → successor); ties by ``key``.

    Raises :class:`graphlib.CycleError` for a graph with a cycle.
    """
    sorter: graphlib.TopologicalSorter[N] = graphlib.TopologicalSorter()
    for node in nodes:
        sorter.add(node)
    for before, after in edges:
        sorter.add(after, before)
    sorter.prepare()
    ready: list[tuple[Any, int, N]] = []
    serial = 0
    for node in sorter.get_ready():
        heapq.heappush(ready, (key(node), serial, node))
        serial += 1
    order: list[N] = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        sorter.done(node)
        for successor in sorter.get_ready():
            heapq.heappush(ready, (key(successor), serial, successor))
            serial += 1
    return order


def find_cycle(depends_on: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One dependency cycle as ``[a, b, …, a]`` (a depends on b …), or None when there is none."""
    edges = [(dep, name) for name, deps in depends_on.items() for dep in deps if dep in depends_on]
    try:
        topological_order(depends_on, edges, key=str)
    except graphlib.CycleError:
        pass
    else:
        return None
    import networkx as nx  # only now: a cycle is there, and networkx reports one the same way every time

    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(depends_on)
    graph.add_edges_from(edges)
    found = nx.find_cycle(graph)
    # edges run dep → dependent; report in "depends on" direction: a → b means a depends on b.
    cycle = [found[0][0]] + [v for _, v in found]
    return list(reversed(cycle))


class Dependencies:
    """One profile's dependency graph, with every look-up the planner makes computed once.

    A plan asks "what does X need" and "what needs X" for many services, many
    times (once per eviction option, per stop, per wanted service); each
    answer is computed on first use and kept for the plan's life.
    """

    def __init__(self, services: Mapping[str, Service]):
        self.names = list(services)
        self._deps: dict[str, list[str]] = {
            name: [d for d in service.depends_on if d in services] for name, service in services.items()}
        self._dependents: dict[str, list[str]] = {name: [] for name in services}
        for name, deps in self._deps.items():
            for dep in deps:
                self._dependents[dep].append(name)
        self._needs: dict[str, frozenset[str]] = {}
        self._needed_by: dict[str, frozenset[str]] = {}
        self._order: dict[str, int] | None = None

    def needs(self, name: str) -> frozenset[str]:
        """``name`` and everything it (transitively) depends on; empty for a name not in the graph."""
        if name not in self._needs:
            self._needs[name] = _reach(name, self._deps)
        return self._needs[name]

    def needed_by(self, name: str) -> frozenset[str]:
        """``name`` and everything that (transitively) depends on it; empty for a name not in the graph."""
        if name not in self._needed_by:
            self._needed_by[name] = _reach(name, self._dependents)
        return self._needed_by[name]

    def order(self) -> dict[str, int]:
        """Each service's place in the lexicographical topological order (dependencies first)."""
        if self._order is None:
            edges = [(dep, name) for name, deps in self._deps.items() for dep in deps]
            self._order = {name: i for i, name in enumerate(topological_order(self.names, edges, key=str))}
        return self._order


def _reach(start: str, neighbours: Mapping[str, list[str]]) -> frozenset[str]:
    if start not in neighbours:
        return frozenset()
    seen = {start}
    stack = [start]
    while stack:
        for other in neighbours[stack.pop()]:
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return frozenset(seen)
