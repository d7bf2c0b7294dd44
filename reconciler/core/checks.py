"""Checks that span several services of a profile, each with the path it concerns.

Field-level rules live on the models; these need the whole profile: a
``depends_on`` naming a missing service, a dependency cycle, two services on
the same host port, two services (or one, twice) answering to the same model
name in the gateway (:mod:`.served`), ``pull: true`` on a service that is not
an Ollama; a ``gpus:`` entry that excludes every GPU of a node is left
to the planner (it depends on the host). The loader turns each path into
``file:line:col``. :func:`check_host` checks a profile against the host a
snapshot shows (a ``gpu_count`` larger than its GPUs), where both are given.

The dependency checks (:func:`check_dependencies`) read only service names and
their ``depends_on`` lists, not validated models, so the loader can also run
them on a profile whose fields are still wrong and report both in one round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from reconciler.core.dependencies import find_cycle
from reconciler.core.profile import Profile, is_ollama
from reconciler.core.served import Claim, claims
from reconciler.core.snapshot import Snapshot

Path = tuple[str | int, ...]


class Problem(NamedTuple):
    path: Path
    message: str


def check_profile(profile: Profile) -> list[Problem]:
    problems = check_dependencies({name: service.depends_on for name, service in profile.services.items()})
    owners: dict[int, str] = {}
    for name, service in profile.services.items():
        port = service.probe_port
        if port is None or service.managed is None:  # a probe port comes with a managed spec
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
    for name, service in profile.services.items():
        if service.pull and not is_ollama(service):
            problems.append(Problem(("services", name, "pull"), f"pull: true applies to an Ollama (one with "
                                    "`backend: ollama`, an `ollama` executable or image, or health_path /api/tags); "
                                    f"{name!r} is not one: drop `pull`"))
    return problems + check_model_names(profile)


def check_model_names(profile: Profile) -> list[Problem]:
    """A model name (or alias) that two services answer to — or one service twice — is ambiguous for the gateway."""
    problems: list[Problem] = []
    first: dict[str, Claim] = {}
    for name, service in profile.services.items():
        for claim in claims(name, service):
            earlier = first.get(claim.name)
            if earlier is None:
                first[claim.name] = claim
            elif earlier.service == claim.service:
                problems.append(Problem(claim.path, f"model name {claim.name!r} is listed twice for service "
                                                    f"{name!r}; list each name (model or alias) once"))
            else:
                problems.append(Problem(claim.path, f"model name {claim.name!r} is already served by service "
                                                    f"{earlier.service!r}; the gateway routes a model to one "
                                                    "service: rename it, or make it an alias of one of them"))
    return problems


def check_host(profile: Profile, snapshot: Snapshot) -> list[Problem]:
    """What a profile asks that the host of ``snapshot`` cannot give: a service spanning more GPUs
    (``gpu_count``) than the host has, or than its ``gpus:`` list names on this host.

    Checked where a profile meets a snapshot (``plan``, ``validate`` given both); live, the
    planner says the same as a pending reason, since GPUs come and go.
    """
    indexes = {gpu.index for gpu in snapshot.gpus}
    count = len(indexes)
    problems = []
    for name, service in profile.services.items():
        if service.gpu_count == 1 or service.max_mb == 0:
            continue
        if service.gpu_count > count:
            problems.append(Problem(
                ("services", name, "gpu_count"),
                f"gpu_count is {service.gpu_count} but node {snapshot.node!r} has {count} GPU"
                f"{'s' if count != 1 else ''}; lower gpu_count or run it on a host with more GPUs"))
        elif service.gpus is not None:
            here = sorted(set(service.gpus) & indexes)
            if len(here) < service.gpu_count:
                listed = ", ".join(map(str, here)) or "none"
                problems.append(Problem(
                    ("services", name, "gpus"),
                    f"gpu_count is {service.gpu_count} but only {len(here)} of the GPUs in gpus are on node "
                    f"{snapshot.node!r} ({listed}); list at least {service.gpu_count} of its GPUs"))
    return problems


def check_dependencies(depends_on: Mapping[str, Sequence[str]]) -> list[Problem]:
    """``depends_on`` entries that name no other service, and one dependency cycle.

    ``depends_on`` maps every service name to the services it depends on (in
    profile order); a service whose list is unknown maps to an empty one.
    """
    problems: list[Problem] = []
    for name, deps in depends_on.items():
        for i, dep in enumerate(deps):
            if dep == name:
                problems.append(Problem(("services", name, "depends_on", i), f"service {name!r} depends on itself"))
            elif dep not in depends_on:
                problems.append(
                    Problem(
                        ("services", name, "depends_on", i),
                        f"service {name!r} depends on {dep!r}, which is not a service of this profile",
                    )
                )
    cycle = find_cycle(depends_on)
    if cycle and len(cycle) > 2:
        problems.append(
            Problem(("services", cycle[0], "depends_on"), "dependency cycle: " + " → ".join(cycle))
        )
    return problems
