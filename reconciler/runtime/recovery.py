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
"""

from __future__ import annotations

from reconciler.core.events import EventKind
from reconciler.core.identity import same_process
from reconciler.core.snapshot import Instance, Launch
from reconciler.drivers.docker import container_name
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
    return lines


async def _recover_start(lifecycle: Lifecycle, intent: Intent) -> tuple[str, str]:
    data, name = intent.data, intent.service
    assert name is not None, "a start intent names its service"
    identity = {k: data.get(k) for k in ("pid", "create_time", "container") if data.get(k) is not None}
    launch = Launch.model_validate(data["launch"]) if data.get("launch") else None
    if not identity and launch is not None and launch.image is not None:
        identity = {"container": container_name(name)}  # docker run may have gone through: look for it
    if not identity and launch is not None and launch.image is None:  # the pid may never have been written
        found = lifecycle.drivers.process.find_started(intent.id)
        if found is not None:
            identity = {"pid": found[0], "create_time": found[1]}
    if not identity:
        return "abandoned", f"{intent.action_id}: interrupted before anything was launched"
    candidate = Instance(
        service=name, gpu=data.get("gpu"), origin="started", model=data.get("model"), launch=launch,
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
