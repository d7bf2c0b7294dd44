"""The ``depends_on`` graph: a networkx DAG over service names.

An edge ``dep → service`` means "start ``dep`` first, stop ``service`` first".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


def dependents_closure(graph: nx.DiGraph[str], roots: Iterable[str]) -> set[str]:
    """``roots`` and everything that (transitively) depends on them."""
    out: set[str] = set()
    for root in roots:
        if root in graph:
            out.add(root)
            out |= nx.descendants(graph, root)
    return out


def dependencies_closure(graph: nx.DiGraph[str], roots: Iterable[str]) -> set[str]:
    """``roots`` and everything they (transitively) depend on."""
    out: set[str] = set()
    for root in roots:
        if root in graph:
            out.add(root)
            out |= nx.ancestors(graph, root)
    return out
