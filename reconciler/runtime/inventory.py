"""Keeping the stored inventory true to the host, once per pass, before planning.

* An instance whose ``(pid, create_time)`` is not alive any more (DESIGN §3
  identity, ±1 s) leaves the store with an event; if we had started it, its
  death counts as a failure for the service's backoff, and an exited
  container of ours is removed (its last output kept in the service's log
  file), so that nothing of a service that has left the profile stays behind. An adopted instance
  without a visible pid leaves once its probe fails. The planner still sees
  the dead one, as ``failed``, so it can say "was pid N" and place the
  replacement where the old one was.
* A ``starting`` instance — one a cut-short pass or a restarted reconciler
  left behind — becomes ``running`` once healthy, or is stopped and counted
  as a failure once past its ``start_timeout_s``.
* A healthy running instance of a service with failures on record is marked
  healthy, so that ten healthy minutes clear its backoff.
* A running instance of ours whose probe fails ``failure_threshold`` passes in
  a row is stopped and counted as a failure; the planner then starts it again,
  as the backoff allows. The count lives in memory (``misses``): a restarted
  reconciler counts afresh, which only delays the verdict.
"""

from __future__ import annotations

from datetime import datetime

from reconciler.core.events import EventKind
from reconciler.core.identity import is_running
from reconciler.core.launch import launch_digest
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Instance, Snapshot
from reconciler.errors import DriverError
from reconciler.runtime.lifecycle import Lifecycle, who


async def _remove_exited(lifecycle: Lifecycle, instance: Instance) -> str:
    """Remove the exited container of an instance of ours found dead (a removed service's would stay behind
    for ever; a kept one's is replaced by its next start anyway); what was done, for the event's message."""
    try:
        done = await lifecycle.drivers.docker.remove_exited(instance)
    except DriverError as exc:
        return f"; its container could not be removed: {exc}"
    return f"; {done}" if done else ""


async def tidy(lifecycle: Lifecycle, profile: Profile, snapshot: Snapshot,
               misses: dict[tuple[str, int | None], int] | None = None) -> Snapshot:
    """Bring the store up to date with ``snapshot``; returns the snapshot to plan from.

    ``misses`` counts consecutive failed probes per running instance, across passes.
    """
    misses = {} if misses is None else misses
    store, now = lifecycle.store, snapshot.now
    by_pid = {p.pid: p for p in snapshot.processes}
    kept: list[Instance] = []
    for instance in snapshot.instances:
        name = instance.service
        spec = profile.services.get(name)
        probe = snapshot.probes.get(name)
        healthy = bool(probe and probe.healthy)
        if instance.pid is not None and not is_running(instance, by_pid):
            store.remove_instance(name)
            gone = f"{who(instance)} is not running any more"
            if instance.container:
                gone += await _remove_exited(lifecycle, instance)
            lifecycle.events.publish(EventKind.INSTANCE_GONE, service=name, message=gone)
            if instance.origin == "started" and instance.launch is not None:
                lifecycle.failure(name, f"pid {instance.pid} exited unexpectedly", launch_digest(instance.launch))
            kept.append(instance.model_copy(update={"state": "failed"}))
            continue
        if instance.origin == "adopted" and instance.pid is None and not healthy:
            store.remove_instance(name)
            lifecycle.events.publish(EventKind.INSTANCE_GONE, service=name, message=f"adopted {name} stopped answering")
            continue
        if instance.origin == "started" and instance.state == "starting" and spec is not None:
            instance = await _settle_start(lifecycle, instance, spec.probe_port is None or healthy,
                                           spec.start_timeout_s, now)
        elif instance.origin == "started" and instance.state == "running" and instance.launch is not None:
            key = (name, instance.pid)
            if spec is not None and spec.probe_port is not None and not healthy:
                misses[key] = misses.get(key, 0) + 1
                if misses[key] >= spec.failure_threshold:
                    misses.pop(key)
                    last = probe.error or f"HTTP {probe.status}" if probe else "no answer"
                    await lifecycle.discard(instance, f"failed {spec.failure_threshold} health probes in a row "
                                                      f"(last: {last})", launch_digest(instance.launch))
                    kept.append(instance.model_copy(update={"state": "failed"}))
                    continue
            else:
                misses.pop(key, None)
                if store.get_backoff(name).failures:
                    lifecycle.healthy(name, launch_digest(instance.launch))
        kept.append(instance)
    return snapshot.model_copy(update={"instances": kept})


async def _settle_start(
    lifecycle: Lifecycle, instance: Instance, healthy: bool, timeout_s: float, now: datetime
) -> Instance:
    digest = launch_digest(instance.launch)
    if healthy:
        return lifecycle.promote(instance, digest)
    started = instance.since or now
    if (now - started).total_seconds() < timeout_s:
        return instance
    await lifecycle.discard(instance, f"not healthy within start_timeout_s {timeout_s:g} s", digest)
    return instance.model_copy(update={"state": "failed"})
