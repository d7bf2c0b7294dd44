"""Crash recovery (invariant 5): finish what a previous reconciler left half done.

Every start and stop writes an intent first (:mod:`.lifecycle`). At startup
the open ones are resolved, oldest first:

* a start whose intent holds the ``(pid, create_time)`` of a live process
  (or a running container of ours) is our instance: it goes (back) into the
  store as ``starting``, and the next pass waits for its health — so a later
  pass sees it and never starts a second copy; a start whose process is dead,
  or that never got as far as launching, is dropped (a container start that
  died before its name was written is looked for under our container name —
  the driver checks our labels before it ever stops one; a process start that
  died before its pid was written is looked for by the ``RECONCILER_INTENT``
  marker the process driver puts in its environment);
* a stop, evict or restart is re-checked: a process that is gone leaves the
  store, one that still runs is ``running`` again, and the next pass plans
  whatever is still needed.

Every intent is finished with what was found — except one that cannot be
checked now (a ``DriverError``: the Docker daemon is down), which stays open
for the next recovery and is reported as ``intent.unresolved``. Instances merely recorded
(no open intent) need nothing here: each pass prunes the dead (identity rule).

Then the processes the inventory does not know. Every process the process
driver starts carries a marker in its environment naming this state
directory, its service, GPU and model (:mod:`reconciler.drivers.process`), so
an inventory that lost it — ``state.db`` deleted, or moved aside because it
was corrupt, or restored from an old copy — need not orphan it. A service
with no instance on record (or only a dead one) whose marked process is
alive gets it back as a ``started`` instance (``instance.recovered``): ours,
so it may be stopped, restarted when its launch spec differs from the
profile, idle-stopped. It is kept as ``starting``, ``since`` now: the next
pass promotes it once healthy (or stops it once past ``start_timeout_s``),
and its idle time counts from now — whoever held leases on it may still be
using it. Its launch spec is rebuilt from the process (argv, cwd, the marked
env keys), so a process that runs something else than the profile says is
restarted. When a service has several such processes (the newest is taken)
or already has a live instance, the others are reported as
``instance.stray`` — left running, never signalled: that they are ours is an
inference from their environment, and stopping one is the operator's call.
A process whose marker names another state directory is never taken.
Leases, demands and backoff records are not in the processes: a lost
inventory loses them.
"""

from __future__ import annotations

from reconciler.core.events import EventKind
from reconciler.core.identity import same_process
from reconciler.core.snapshot import Instance, Launch
from reconciler.drivers.process import FoundProcess
from reconciler.errors import DriverError
from reconciler.runtime.lifecycle import Lifecycle, who
from reconciler.store.base import Intent


async def recover(lifecycle: Lifecycle) -> list[str]:
    """Resolve every open intent; returns one line per intent, for the log."""
    lines = []
    for intent in lifecycle.store.open_intents():
        try:
            if intent.kind == "start":
                outcome, line = await _recover_start(lifecycle, intent)
            else:
                outcome, line = await _recover_stop(lifecycle, intent)
        except DriverError as exc:  # e.g. the Docker daemon is down: left open for a later recovery
            line = f"{intent.action_id}: cannot be checked now ({exc}); left open"
            lifecycle.events.publish(EventKind.INTENT_UNRESOLVED, service=intent.service, action=intent.action_id,
                                     message=line)
            lines.append(line)
            continue
        lifecycle.store.finish_intent(intent.id, outcome, {"recovered": line})
        lifecycle.events.publish(EventKind.INTENT_RECOVERED, service=intent.service, action=intent.action_id,
                                 outcome=outcome, message=line)
        lines.append(line)
    return lines + await refind(lifecycle)


async def refind(lifecycle: Lifecycle) -> list[str]:
    """Take back the live processes of ours that the inventory does not know; one line each, for the log."""
    store = lifecycle.store
    recorded = {i.service: i for i in store.instances()}
    unknown: dict[str, list[FoundProcess]] = {}
    for found in lifecycle.drivers.process.find_ours():
        known = recorded.get(found.service)
        if known is None or not same_process(known, found):
            unknown.setdefault(found.service, []).append(found)
    lines = []
    for service, candidates in sorted(unknown.items()):
        candidates.sort(key=lambda f: (f.create_time, f.pid), reverse=True)  # the newest launch first
        known = recorded.get(service)
        holder = known if known is not None and await lifecycle.drivers.alive(known) else None
        strays = candidates
        if holder is None:
            chosen, strays = candidates[0], candidates[1:]
            holder = Instance(
                service=service, gpu=chosen.gpu, gpus=list(chosen.gpus) or None, origin="started", pid=chosen.pid,
                create_time=chosen.create_time,
                model=chosen.model, launch=chosen.launch, state="starting", since=lifecycle.clock.now(),
            )
            store.put_instance(holder)
            line = (f"found {who(holder)} running, started from this state directory (its environment says so) "
                    "but missing from the inventory: it is an instance again, kept as starting until healthy")
            lifecycle.events.publish(EventKind.INSTANCE_RECOVERED, service=service, pid=chosen.pid,
                                     create_time=chosen.create_time, gpu=chosen.gpu, model=chosen.model,
                                     message=line)
            lines.append(line)
        for stray in strays:
            line = (f"{service} (pid {stray.pid}) was started from this state directory, but {who(holder)} is "
                    f"the instance of {service}; pid {stray.pid} is left running and never signalled — stop it "
                    "yourself if it is not needed")
            lifecycle.events.publish(EventKind.INSTANCE_STRAY, service=service, pid=stray.pid,
                                     create_time=stray.create_time, message=line)
            lines.append(line)
    return lines


async def _recover_start(lifecycle: Lifecycle, intent: Intent) -> tuple[str, str]:
    data, name = intent.data, intent.service
    assert name is not None, "a start intent names its service"
    identity = {k: data.get(k) for k in ("pid", "create_time", "container") if data.get(k) is not None}
    launch = Launch.model_validate(data["launch"]) if data.get("launch") else None
    if not identity and launch is not None and launch.image is not None:
        identity = {"container": lifecycle.drivers.docker.container_name(name)}  # docker run may have gone through
    if not identity and launch is not None and launch.image is None:  # the pid may never have been written
        found = lifecycle.drivers.process.find_started(intent.id)
        if found is not None:
            identity = {"pid": found[0], "create_time": found[1]}
    if not identity:
        return "abandoned", f"{intent.action_id}: interrupted before anything was launched"
    candidate = Instance(
        service=name, gpu=data.get("gpu"), gpus=data.get("gpus"), origin="started", model=data.get("model"),
        launch=launch,
        state="starting", since=intent.started_at, **identity,
    )
    store = lifecycle.store
    recorded = store.get_instance(name)
    if not await lifecycle.drivers.alive(candidate):
        if recorded is not None and _same(recorded, candidate):
            store.remove_instance(name)
        return "abandoned", f"{intent.action_id}: {who(candidate)} is not running any more"
    if candidate.container and candidate.pid is None:
        candidate = candidate.model_copy(update=await lifecycle.drivers.container_identity(candidate.container))
    if recorded is None or not _same(recorded, candidate):
        store.put_instance(candidate)
        return "recovered", f"{intent.action_id}: found {who(candidate)} running; kept as starting"
    return "recovered", f"{intent.action_id}: {who(recorded)} was already recorded ({recorded.state})"


async def _recover_stop(lifecycle: Lifecycle, intent: Intent) -> tuple[str, str]:
    store, name = lifecycle.store, intent.service
    recorded = store.get_instance(name) if name else None
    if not name or recorded is None:
        return "gone", f"{intent.action_id}: nothing left in the inventory"
    if recorded.origin == "started" and not await lifecycle.drivers.alive(recorded):
        store.remove_instance(name)
        return "gone", f"{intent.action_id}: {who(recorded)} is gone"
    if recorded.state == "stopping":
        store.put_instance(recorded.model_copy(update={"state": "running"}))
    return "interrupted", f"{intent.action_id}: {who(recorded)} still runs; the next pass decides again"


def _same(a: Instance, b: Instance) -> bool:
    if a.container or b.container:
        return a.container == b.container
    return same_process(a, b)
