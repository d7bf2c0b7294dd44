"""What an operator asks of a running reconciler: stop, start, restart, reset a service; take everything down.

These are the verbs of ``systemctl`` and ``docker compose``, fitted to a
reconciler, where a process that is stopped behind the loop's back is
simply started again by the next pass. So each verb changes what the
*planner* reads, and the loop does the rest, in its usual order and with
its usual safety (dependents first, only processes we started, never an
adopted one):

* **stop** holds the service stopped: the store records a hold (it survives
  a restart of the reconciler, like ``systemctl mask`` rather than
  ``systemctl stop``), the snapshot carries it as ``held``, and the planner
  treats the service as not wanted whatever asks for it — an ``always_on``
  service too, which is the point: nothing else could keep one down. Its
  leases are released, lease requests for it are refused at once (503,
  saying who stopped it and how to start it), and what depends on it stops
  first and stays down with it. An *adopted* instance is not ours to stop:
  ``stop`` refuses (409) and says where to stop it.
* **start** removes the hold. The service then runs as the profile says: an
  ``always_on`` one is started by the next pass, a leased one when a lease
  asks for it. (``start`` does not pin a service that nothing wants: the
  profile's ``always_on`` is the way to say that.)
* **restart** marks our instance for a restart (the inventory's ``restart``:
  ``when_idle``, or ``now`` with ``--now``); the planner restarts it as it
  would for a changed launch spec — a busy one waits until its leases end
  (issue 8.12's drain rule) unless ``now``. A held service is released
  first (``restart`` of a stopped unit starts it, as systemd does).
* **reset** forgets the service's backoff record: a backing-off or stalled
  service is tried at the next pass, which is woken at once.
* **down** holds every service that has an instance of ours (and every
  service of the profile that has none and is not adopted), so everything
  this state directory started stops, dependents first, and stays stopped
  until ``reconciler start`` — ``start --all`` lifts every hold. Adopted
  instances are left alone. Without a running server, ``reconciler down``
  does the same in one converge of its own, with holds that it does not
  store (the next ``serve`` starts what the profile wants again).

Each verb publishes ``operator.request`` (who asked for what), wakes the
loop, and — except for a restart that waits for leases to end — waits for
the pass that carries it out, up to ``wait_s``, so that the command returns
once the service is stopped or restarted, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Instance
from reconciler.errors import OperatorRefused, ReconcilerError
from reconciler.runtime.runtime import Runtime

DEFAULT_WAIT_S = 60.0
API_URL_META = "api_url"  # the store's meta key: where `serve` on this state directory answers (for `down`)
GPU_META = "gpu"  # its --gpu spec
PROFILE_META = "profile"  # the profile file the last `serve`/`watch`/`apply` here used (for `down` without one)


def remember(runtime: Runtime, profile_path: Path | str | None, gpu: str) -> None:
    """Record the profile file and ``--gpu`` of this run (``serve``, ``watch``, ``apply``), for a later
    ``reconciler down`` without them; forget an API address a previous server left (ours records its own)."""
    with contextlib.suppress(ReconcilerError):  # a failing store is reported by the pass that uses it
        runtime.store.set_meta(API_URL_META, None)
        if profile_path is not None:
            runtime.store.set_meta(PROFILE_META, str(Path(profile_path).resolve()))
        runtime.store.set_meta(GPU_META, gpu)


@dataclass
class Done:
    """What a verb did, in words, and whether it finished within its wait."""

    service: str | None
    verb: str
    message: str
    done: bool = True
    stopped: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def _known(profile: Profile, runtime: Runtime, service: str) -> None:
    if service in profile.services or runtime.store.get_instance(service) is not None:
        return
    known = ", ".join(sorted(profile.services)) or "none"
    raise OperatorRefused("unknown", f"no service {service!r} in profile {profile.name!r} (services: {known})")


def _adopted(instance: Instance | None) -> bool:
    return instance is not None and instance.origin == "adopted"


async def _until(runtime: Runtime, settled: Callable[[], bool], wait_s: float) -> bool:
    """Wake the loop and wait, pass by pass, until ``settled()`` or ``wait_s`` passes; whether it settled."""
    deadline = runtime.clock.monotonic() + wait_s
    while True:
        passed = runtime.passed.current()
        runtime.wake()
        if settled():
            return True
        left = deadline - runtime.clock.monotonic()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(passed.wait(), timeout=left)
        except TimeoutError:
            return settled()


async def _one_pass(runtime: Runtime, wait_s: float) -> None:
    passed = runtime.passed.current()
    runtime.wake()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(passed.wait(), timeout=wait_s)


def _ours_gone(runtime: Runtime, services: set[str]) -> Callable[[], bool]:
    def check() -> bool:
        return not any(i.service in services and i.origin == "started" for i in runtime.store.instances())
    return check


async def stop(runtime: Runtime, profile: Profile, service: str, wait_s: float = DEFAULT_WAIT_S) -> Done:
    _known(profile, runtime, service)
    instance = runtime.store.get_instance(service)
    if _adopted(instance):
        raise OperatorRefused("conflict", f"{service} is adopted (pid {instance.pid if instance else '?'}, started "
                              "outside the reconciler), which never signals it: stop it where it was started "
                              "(e.g. `systemctl stop`); nothing was changed")
    new = runtime.store.hold(service, "reconciler stop")
    runtime.events.publish(EventKind.OPERATOR_REQUEST, service=service, verb="stop",
                           message=f"stop {service}: held stopped until `reconciler start {service}`")
    dependents = {i.service for i in runtime.store.instances()} & _dependents(profile, service)
    done = await _until(runtime, _ours_gone(runtime, {service} | dependents), wait_s)
    also = sorted(dependents - {service})
    text = (f"{service} stopped" if instance is not None else f"{service} was not running") + (
        f" (with {', '.join(also)}, which depend{'s' if len(also) == 1 else ''} on it)" if also else "")
    if not done:
        text = (f"{service} is held stopped; its stop has not finished within {wait_s:g} s "
                f"(see `reconciler why {service}`)")
    held = "" if new else " (it was held already)"
    return Done(service, "stop", f"{text}; it stays stopped{held} until `reconciler start {service}`", done,
                stopped=[service, *also] if instance is not None else also)


def _dependents(profile: Profile, service: str) -> set[str]:
    out = {service}
    changed = True
    while changed:
        changed = False
        for name, spec in profile.services.items():
            if name not in out and out & set(spec.depends_on):
                out.add(name)
                changed = True
    return out


async def start(runtime: Runtime, profile: Profile, service: str | None, wait_s: float = DEFAULT_WAIT_S) -> Done:
    """Lift the hold on ``service`` (None: on every service)."""
    if service is None:
        held = sorted(runtime.store.holds())
        for name in held:
            runtime.store.unhold(name)
        runtime.events.publish(EventKind.OPERATOR_REQUEST, verb="start", services=held,
                               message=f"start: {', '.join(held) or 'nothing'} may run again")
        await _one_pass(runtime, wait_s)
        return Done(None, "start", f"{', '.join(held)} may run again" if held else "nothing was held stopped")
    _known(profile, runtime, service)
    was = runtime.store.unhold(service)
    spec = profile.services.get(service)
    if not was:
        return Done(service, "start", f"{service} is not held stopped; nothing to do (it runs when the profile "
                                      "wants it: always_on, or asked for by a lease)")
    runtime.events.publish(EventKind.OPERATOR_REQUEST, service=service, verb="start",
                           message=f"start {service}: it may run again")
    if spec is not None and spec.always_on and spec.managed is not None:
        done = await _until(runtime, lambda: _running(runtime, service), wait_s)
        return Done(service, "start", f"{service} is running again" if done else
                    f"{service} may run again; it is not running yet (see `reconciler why {service}`)", done)
    await _one_pass(runtime, wait_s)
    return Done(service, "start", f"{service} may run again: it starts when a lease asks for it "
                                  "(it is not always_on)")


def _running(runtime: Runtime, service: str) -> bool:
    instance = runtime.store.get_instance(service)
    return instance is not None and instance.state == "running"


async def restart(runtime: Runtime, profile: Profile, service: str, *, now: bool = False,
                  wait_s: float = DEFAULT_WAIT_S) -> Done:
    _known(profile, runtime, service)
    if service not in profile.services:
        raise OperatorRefused("conflict", f"{service} is no longer in the profile; the next pass stops it")
    unheld = runtime.store.unhold(service)
    async with runtime.exclusive():  # no pass is deciding about this instance meanwhile
        instance = runtime.store.get_instance(service)
        if _adopted(instance):
            raise OperatorRefused("conflict", f"{service} is adopted (started outside the reconciler), which never "
                                  "signals it: restart it where it was started; nothing was changed")
        if instance is not None:
            runtime.store.put_instance(instance.model_copy(update={"restart": "now" if now else "when_idle"}))
    runtime.events.publish(EventKind.OPERATOR_REQUEST, service=service, verb="restart", now=now,
                           message=f"restart {service}" + (" now" if now else ""))
    if instance is None:
        await _one_pass(runtime, wait_s)
        return Done(service, "restart", f"{service} was not running" + (
            " (it was held stopped: it may run again)" if unheld else "") + "; it starts when the profile wants it")
    old = (instance.pid, instance.create_time)

    def restarted() -> bool:
        current = runtime.store.get_instance(service)
        return current is not None and (current.pid, current.create_time) != old and current.state == "running"

    passed = runtime.passed.current()
    runtime.wake()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(passed.wait(), timeout=wait_s)
    last = runtime.last_pass()
    draining = [p.reason for p in (last.plan.pending if last is not None else []) if p.service == service
                and "waits until" in p.reason]
    if draining and not now and not restarted():
        return Done(service, "restart", f"{service}: {draining[0]}", done=False)
    done = await _until(runtime, restarted, wait_s)
    current = runtime.store.get_instance(service)
    if done and current is not None:
        return Done(service, "restart", f"{service} restarted (pid {current.pid})")
    return Done(service, "restart", f"{service}: the restart has not finished within {wait_s:g} s "
                                    f"(see `reconciler why {service}`)", done=False)


async def reset(runtime: Runtime, profile: Profile, service: str) -> Done:
    _known(profile, runtime, service)
    backoff = runtime.store.get_backoff(service)
    runtime.store.reset_backoff(service)
    if not backoff.failures and not backoff.stalled:
        return Done(service, "reset", f"{service} has no failures on record; nothing to reset")
    runtime.events.publish(EventKind.OPERATOR_REQUEST, service=service, verb="reset",
                           message=f"reset {service}: {backoff.failures} failure(s) forgotten; tried at the next pass")
    runtime.wake()
    return Done(service, "reset", f"{service}: {backoff.failures} failure(s) forgotten"
                                  f"{' (it was stalled)' if backoff.stalled else ''}; it is tried at the next pass")


def down_holds(runtime: Runtime, profile: Profile) -> tuple[list[str], list[str]]:
    """(services to hold, adopted services left alone) for ``down``."""
    instances = {i.service: i for i in runtime.store.instances()}
    left = sorted(name for name, i in instances.items() if i.origin == "adopted")
    hold = sorted((set(profile.services) | set(instances)) - set(left))
    return hold, left


async def down(runtime: Runtime, profile: Profile, wait_s: float = DEFAULT_WAIT_S) -> Done:
    """Hold every service but the adopted ones; wait until none of ours runs."""
    hold, left = down_holds(runtime, profile)
    ours = sorted(i.service for i in runtime.store.instances() if i.origin == "started")
    for name in hold:
        runtime.store.hold(name, "reconciler down")
    runtime.events.publish(EventKind.OPERATOR_REQUEST, verb="down", services=hold,
                           message=f"down: {', '.join(ours) or 'nothing of ours runs'}"
                                   f"{'; left alone (adopted): ' + ', '.join(left) if left else ''}")
    done = await _until(runtime, _ours_gone(runtime, set(ours)), wait_s)
    still = sorted(i.service for i in runtime.store.instances() if i.origin == "started")
    text = (f"stopped {', '.join(ours)}" if ours else "nothing of ours was running") if done else (
        f"not everything stopped within {wait_s:g} s: {', '.join(still)} still run(s)")
    if left:
        text += f"; adopted, left running: {', '.join(left)}"
    text += "; every service stays stopped until `reconciler start --all` (or `start SERVICE`)"
    return Done(None, "down", text, done, stopped=[s for s in ours if s not in still], left=left)
