"""The ``depends_on`` graph: a networkx DAG over service names.

An edge ``dep → service`` means "start ``dep`` first, stop ``service`` first".
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx

from reconciler.core.profile import Service


def dependency_graph(services: Mapping[str, Service]) -> nx.DiGraph[str]:
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(services)
    for name, service in services.items():
        for dep in service.depends_on:
            if dep in services:
                graph.add_edge(dep, name)
    return graph


def find_cycle(graph: nx.DiGraph[str]) -> list[str] | None:
    """One dependency cycle as ``[a, b, …, a]``, or None for a DAG."""
    try:
        edges = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return None
    # edges run dep → dependent; report in "depends on" direction: a → b means a depends on b.
    cycle = [edges[0][0]] + [v for _, v in edges]
    return list(reversed(cycle))


class Dependencies:
    """One profile's dependency graph, with every look-up the planner makes computed once.

    A plan asks "what does X need" and "what needs X" for many services, many
    times (once per eviction option, per stop, per wanted service); each
    answer is computed on first use and kept for the plan's life.
    """

    def __init__(self, services: Mapping[str, Service]):
        self.graph = dependency_graph(services)
        self._needs: dict[str, frozenset[str]] = {}
        self._needed_by: dict[str, frozenset[str]] = {}
        self._order: dict[str, int] | None = None

    def needs(self, name: str) -> frozenset[str]:
        """``name`` and everything it (transitively) depends on; empty for a name not in the graph."""
        if name not in self._needs:
            found = {name, *nx.ancestors(self.graph, name)} if name in self.graph else set()
            self._needs[name] = frozenset(found)
        return self._needs[name]

    def needed_by(self, name: str) -> frozenset[str]:
        """``name`` and everything that (transitively) depends on it; empty for a name not in the graph."""
        if name not in self._needed_by:
            found = {name, *nx.descendants(self.graph, name)} if name in self.graph else set()
            self._needed_by[name] = frozenset(found)
        return self._needed_by[name]

    def order(self) -> dict[str, int]:
        """Each service's place in the lexicographical topological order (dependencies first)."""
        if self._order is None:
            self._order = {name: i for i, name in enumerate(nx.lexicographical_topological_sort(self.graph))}
        return self._order
