"""Checks that span several services of a profile, each with the path it concerns.

Field-level rules live on the models; these need the whole profile: a
``depends_on`` naming a missing service, a dependency cycle, two services on
the same host port, a ``gpus:`` entry that excludes every GPU of a node is left
to the planner (it depends on the host). The loader turns each path into
``file:line:col``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.dependencies import dependency_graph, find_cycle
from reconciler.core.profile import Profile

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str


def check_profile(profile: Profile) -> list[Problem]:
    problems: list[Problem] = []
    for name, service in profile.services.items():
        for i, dep in enumerate(service.depends_on):
            if dep == name:
                problems.append(Problem(("services", name, "depends_on", i), f"service {name!r} depends on itself"))
            elif dep not in profile.services:
                problems.append(
                    Problem(
                        ("services", name, "depends_on", i),
                        f"service {name!r} depends on {dep!r}, which is not a service of this profile",
                    )
                )
    cycle = find_cycle(dependency_graph(profile.services))
    if cycle and len(cycle) > 2:
        problems.append(
            Problem(("services", cycle[0], "depends_on"), "dependency cycle: " + " → ".join(cycle))
        )
    owners: dict[int, str] = {}
    for name, service in profile.services.items():
        port = service.probe_port
        if port is None:
            continue
        if port in owners:
            problems.append(
                Problem(
                    ("services", name, "managed", "host_port" if service.managed.host_port else "port"),
                    f"host port {port} is already used by service {owners[port]!r}; give each service its own port",
                )
            )
        else:
            owners[port] = name
    return problems
