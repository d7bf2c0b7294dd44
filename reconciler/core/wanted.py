"""Which services are wanted, and why (DESIGN §3, "Wanted").

A service is wanted when it is ``always_on``, has an active lease or a
demand, is a dependency of a wanted service, or is running and not past
``idle_stop_after_s``. Idle time counts from the instance's ``idle_since``;
when that is null, from the end of its last lease (an expired lease ended at
its ``expires_at``), else from ``since``. ``idle_stop_after_s: 0`` never
idle-stops. An instance's ``keep_alive_s`` (an Ollama-protocol request's
``keep_alive``, set by the gateway) overrides ``idle_stop_after_s`` for that
instance: 0 stops it as soon as it is idle, a negative value never. A
service missing from the profile is never wanted.

Adopted instances are never stopped for idleness: the process is not ours to
stop, so an idle adopted service stays adopted and keeps counting.
"""

from __future__ import annotations

from typing import NamedTuple

from reconciler.core.dependencies import Dependencies
from reconciler.core.world import World


class Wanted(NamedTuple):
    wanted: dict[str, str]  # service → why it is wanted
    unwanted: dict[str, str]  # running service → why it is not wanted any more


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 or value == int(value) else f"{value:.1f} s"


def idle_reason(world: World, service: str) -> tuple[bool, str]:
    """(still wanted, why) for a running service with no lease and no demand."""
    spec = world.profile.services[service]
    instance = world.instances[service]
    if instance.origin == "adopted":
        return True, "adopted; never stopped for idleness"
    limit, named = spec.idle_stop_after_s, "idle_stop_after_s"
    if instance.keep_alive_s is not None:
        limit, named = instance.keep_alive_s, "keep_alive of its last request"
        if limit < 0:
            return True, f"running ({named} is {_seconds(limit)}: never idle-stopped)"
    elif limit == 0:
        return True, "running (idle_stop_after_s is 0: never idle-stopped)"
    ended = [lease.expires_at for lease in world.expired_leases if lease.service == service and lease.expires_at]
    start = instance.idle_since or (max(ended) if ended else None) or instance.since
    if start is None:
        return True, "running (no idle time known)"
    idle = (world.now - start).total_seconds()
    if idle < limit:
        return True, f"running, idle for {_seconds(idle)} of {named} {_seconds(limit)}"
    return False, f"idle for {_seconds(idle)} ({named} is {_seconds(limit)})"


def held_closure(world: World, deps: Dependencies) -> dict[str, str]:
    """Service → why it is held stopped: the snapshot's ``held`` ones, and every service that needs one."""
    out: dict[str, str] = {}
    for name in sorted(world.snapshot.held):
        if name in world.profile.services:
            out.setdefault(name, f"stopped by an operator (`reconciler start {name}` lets it run again)")
    for name in sorted(world.profile.services):
        if name in out:
            continue
        blocking = sorted(d for d in deps.needs(name) - {name} if d in world.snapshot.held)
        if blocking:
            out[name] = (f"needs {blocking[0]}, which is stopped by an operator "
                         f"(`reconciler start {blocking[0]}` lets it run again)")
    return out


def held_reason(world: World, service: str, deps: Dependencies | None = None) -> str | None:
    """Why ``service`` is held stopped, or None."""
    if not world.snapshot.held:
        return None
    return held_closure(world, deps if deps is not None else Dependencies(world.profile.services)).get(service)


def compute_wanted(world: World, deps: Dependencies | None = None) -> Wanted:
    profile = world.profile
    wanted: dict[str, str] = {}
    unwanted: dict[str, str] = {}
    deps = deps if deps is not None else Dependencies(profile.services)
    held = held_closure(world, deps) if world.snapshot.held else {}
    demanded: dict[str, list[str]] = {}
    for demand in world.snapshot.demands:
        demanded.setdefault(demand.service, []).append(demand.id)
    for name, spec in profile.services.items():
        leases = world.leases_of(name)
        if name in held:
            if name in world.instances:
                unwanted[name] = held[name]
        elif spec.always_on:
            wanted[name] = "always_on"
        elif leases:
            wanted[name] = f"{len(leases)} lease{'s' if len(leases) != 1 else ''} held"
        elif name in demanded:
            wanted[name] = "demand " + ", ".join(demanded[name])
        elif name in world.instances:
            keep, why = idle_reason(world, name)
            (wanted if keep else unwanted)[name] = why
    for name in list(wanted):
        for dep in sorted(deps.needs(name) - {name}):
            if dep not in wanted:
                wanted[dep] = f"needed by {name}"
                unwanted.pop(dep, None)
    for name in world.instances:
        if name not in profile.services:
            unwanted[name] = "no longer in the profile"
    return Wanted(wanted, unwanted)
