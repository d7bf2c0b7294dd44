"""The daemon loop: keep the host converged to a profile, and converge again on every save.

:class:`Loop` is what ``reconciler watch`` and ``reconciler serve`` run. Given
a runtime, the profile watcher (:mod:`reconciler.loading.watcher`) and the
profile loaded at start-up, it recovers (the runtime finds its instances
again and resolves what a crash left half done), then runs a pass — observe,
plan, apply, as one bounded converge — at start, on every saved change of the
profile, every ``resync`` seconds (the watcher's tick), when the runtime asks
for one (:meth:`~reconciler.runtime.Runtime.wake`: a lease request waits), on
the next due backoff attempt, while an instance is still starting, and every
``probe_interval_s`` of the profile's services while any runs (a dead service
is noticed and restarted, subject to backoff).

**Edits.** A saved edit that is invalid, or that empties ``services`` without
``allow_empty``, is rejected — ``profile.rejected`` with the located
diagnostics — and the last good profile stays in force (invariant 2).
Otherwise ``profile.reloaded``, and the next pass applies it — at once, unless
it removes services: then ``profile.held`` and it waits until the file has not
changed for :data:`REMOVAL_SETTLE_S` (twice that when it removes more than
half of what runs), so a file written in two chunks never stops what its
second half keeps.

**Failures.** A pass that raises (the GPU or the store unreadable for a
moment, or a bug) is reported as ``pass.failed`` and retried after
:data:`RETRY_AFTER_ERROR_S`; it touched no service, so the loop goes on. A
bug's traceback goes to stderr; a deliberate error's message is enough. A
store that fails is reported once (``store.failed``, by the event bus) and
does not end the loop: the events that cannot be recorded are still shown,
the services keep running, and passes are retried until it works again.

**Stopping.** SIGINT or SIGTERM ends the loop, *leaving the services
running*: a pass in flight gets :data:`STOP_GRACE_S` plus the profile's
``eviction_timeout_s`` to finish (a second signal: none), then is cancelled —
which leaves what a crash would (open intents), and the next run resolves it
(invariant 5). The loop owns the signals while it runs.

**Supervisors.** Under systemd (``Type=notify``) the loop says ``READY=1`` once
it has found its instances again and its companions serve, a ``STATUS=`` line
after each pass, and ``STOPPING=1`` on a stop signal (:mod:`reconciler.host.systemd`).

**Companions.** Something that serves beside the loop — the HTTP API — is a
:class:`Companion`: started once the loop is up (with the runtime and a way
to read the profile in force), stopped before the runtime closes.

Every wait is on the injected clock; the events are declared in
:mod:`reconciler.core.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.core.report import PassReport
from reconciler.errors import Diagnostic, GuardError, ReconcilerError, StoreError
from reconciler.loading.watcher import ProfileChange, ProfileWatcher, Resync
from reconciler.runtime.events import EventBus
from reconciler.runtime.guard import check_profile_guard
from reconciler.runtime.runtime import Runtime

PASS_BUDGET_S = 2.0  # a pass stops waiting for slow starts after this; later passes finish them
STARTING_POLL_S = 0.3  # how soon to look again while an instance is still starting
STOP_GRACE_S = 5.0  # after SIGINT/SIGTERM, a pass in flight gets this long (plus eviction_timeout_s)
MIN_LIVENESS_S = 0.25
RETRY_AFTER_ERROR_S = 5.0  # after a pass that raised
WATCH_RETRY_MAX_S = 5.0  # a profile that cannot be watched is tried again this often (or at resync)
REMOVAL_SETTLE_S = 1.0  # an edit that removes services waits this long after the file's last change

T = TypeVar("T")


class Cancelled:
    """What a pass cut short by a stop returns instead of its report."""


CANCELLED = Cancelled()


class Companion(Protocol):
    """Serves beside the loop (the HTTP API): started with the runtime, stopped before it closes."""

    async def start(self, runtime: Runtime, profile: Callable[[], Profile]) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Started:
    """What ``watch.started`` says about this run (where the profile is, which GPU, which state)."""

    path: str
    gpu: str
    state_dir: str
    detected: str = ""


def diagnostics_data(diagnostics: Sequence[Diagnostic]) -> list[dict[str, Any]]:
    return [{"file": d.file, "line": d.line, "col": d.col, "message": d.message} for d in diagnostics]


@dataclass(frozen=True)
class Held:
    """An edit that removes services, waiting for the file to settle."""

    profile: Profile
    change: ProfileChange
    until: float  # on the clock's monotonic time


class Loop:
    """The watch loop over one runtime; :meth:`run` until :meth:`stop`."""

    def __init__(
        self,
        runtime: Runtime,
        watcher: ProfileWatcher,
        first: ProfileChange,
        *,
        bus: EventBus,
        started: Started,
        allow_empty: bool = False,
        resync_s: float = 30.0,
        where: str = "",
        companions: Sequence[Companion] = (),
        notify: Callable[[str], object] = lambda message: None,
    ):
        assert first.profile is not None, "start the loop with a valid profile"
        self.runtime = runtime
        self.watcher = watcher
        self.bus = bus
        self.clock = runtime.clock
        self.started = started
        self.allow_empty = allow_empty
        self.resync_s = resync_s
        self.where = where  # what a rejected change names when the watcher gives no path
        self.companions = list(companions)
        self.notify = notify  # a supervisor's readiness protocol (systemd's sd_notify), when there is one
        self.profile: Profile = first.profile  # the profile in force (companions read it)
        bus.redactor.learn(first.profile.expansions)
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.grace_s = STOP_GRACE_S
        self.signal_name: str | None = None
        self.passes = 0
        self._held: Held | None = None
        self._told: tuple[tuple[object, ...], ...] | None = None  # what waited at the last pass.finished told

    # --- the whole run ---------------------------------------------------------------

    async def run(self) -> None:
        """Publish ``watch.started``, start the companions, loop until stopped, then ``watch.stopped``."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop, sig)
        started: list[Companion] = []
        try:
            info = self.started
            held: list[str] = []
            with contextlib.suppress(StoreError):  # the first pass reports a failing store
                held = sorted(self.runtime.store.holds())
            note = (f"; held stopped by an operator: {', '.join(held)} (`reconciler start --all` lets them run)"
                    if held else "")
            self.bus.publish(
                EventKind.WATCH_STARTED,
                message=f"profile {self.profile.name} ({info.path}), GPU {info.gpu}, state {info.state_dir}{note}",
                held=held,
                profile=self.profile.name, path=info.path, gpu=info.gpu, state_dir=info.state_dir, pid=os.getpid(),
                **({"detected": info.detected} if info.detected else {}),
            )
            for companion in self.companions:
                await companion.start(self.runtime, lambda: self.profile)
                started.append(companion)
            await self._loop()
            self.bus.publish(EventKind.WATCH_STOPPED, message=f"{self.signal_name or 'stopped'}: services left running",
                             signal=self.signal_name)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self.watcher.stop()
            for companion in reversed(started):
                await companion.stop()

    def stop(self, sig: signal.Signals | None = None) -> None:
        """End the loop (a signal's handler); a second call cuts the pass in flight short."""
        self.notify("STOPPING=1")
        if self.stopping.is_set():
            self.hurry.set()
        self.signal_name = sig.name if sig is not None else None
        self.stopping.set()

    # --- passes and what triggers them -------------------------------------------------

    async def _loop(self) -> None:
        triggers: asyncio.Queue[ProfileChange | Resync] = asyncio.Queue()
        watching = asyncio.ensure_future(self._watch(triggers))
        try:
            if await self._run(self.runtime.recover()) is CANCELLED:
                return
            self.notify(f"READY=1\nSTATUS=serving profile {self.profile.name}")
            reason: str | None = "start"
            while reason is not None and not self.stopping.is_set():
                report = await self._pass(reason)
                if isinstance(report, Cancelled):
                    return
                due = ("retry", RETRY_AFTER_ERROR_S)
                if report is not None:
                    with contextlib.suppress(StoreError):  # the store failing now: the next pass says so
                        due = self._due_in(report)
                reason = await self._next(triggers, due)
        finally:
            self.watcher.stop()
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    async def _watch(self, triggers: asyncio.Queue[ProfileChange | Resync]) -> None:
        while not self.stopping.is_set():
            try:
                async for event in self.watcher.events():
                    triggers.put_nowait(event)
                return
            except Exception as exc:  # the directory went away, inotify limits…: retry, services unaffected
                retry = min(self.resync_s, WATCH_RETRY_MAX_S)
                self.bus.publish(EventKind.WATCH_DEGRADED,
                                 message=f"cannot watch the profile ({exc}); retrying in {retry:g} s")
                await self.clock.sleep(retry)

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T | Cancelled:
        """Await ``coro``; after a stop signal it gets ``grace_s`` more (a second signal: none), then is cancelled.

        A cancelled pass is what a crash would leave: its intents are open, and
        the next run resolves them (invariant 5). Returns :data:`CANCELLED` then.
        """
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self.stopping.wait())
        hurry = asyncio.ensure_future(self.hurry.wait())
        grace: asyncio.Future[None] | None = None
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                grace = asyncio.ensure_future(self.clock.sleep(self.grace_s))
                await asyncio.wait({task, hurry, grace}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return CANCELLED
            return task.result()
        finally:
            for waiter in (stop, hurry, grace):
                if waiter is not None:
                    waiter.cancel()

    async def _pass(self, reason: str) -> PassReport | Cancelled | None:
        """One bounded pass with its events: the report, None when it failed, or :data:`CANCELLED`."""
        self.passes += 1
        number, profile = self.passes, self.profile
        self.bus.announce(EventKind.PASS_STARTED, message=f"pass {number} ({reason})", reason=reason,
                          profile=profile.name, **{"pass": number})
        started = self.clock.monotonic()
        self.grace_s = STOP_GRACE_S + profile.eviction_timeout_s
        try:
            report = await self._run(self.runtime.converge(profile, PASS_BUDGET_S))
        except Exception as exc:  # noqa: BLE001 - a daemon reports, waits, and tries again
            if not isinstance(exc, ReconcilerError):
                traceback.print_exc(file=sys.stderr)
            self.bus.publish(EventKind.PASS_FAILED, message=f"pass {number} ({reason}) failed: {exc}; retrying in "
                             f"{RETRY_AFTER_ERROR_S:g} s", reason=reason, error=type(exc).__name__,
                             duration_s=round(self.clock.monotonic() - started, 3), **{"pass": number})
            return None
        if isinstance(report, Cancelled):
            return report
        counts = {k: v for k, v in report.counts().items() if v}
        pending = len(report.plan.pending)
        self.notify(f"STATUS=profile {profile.name}: " + (f"{pending} pending" if pending else
                    "converged" if report.converged else "converging"))
        # Quiet (shown with quiet=true, not recorded, not printed): nothing was done — no action ran (a start
        # held back by its backoff is not an action taken) — and what waits is what waited at the last pass
        # that was told. A stalled service waiting out its backoff costs no line per pass.
        acted = any(o.status != "deferred" for r in report.passes for o in r.outcomes.values())
        waiting = (tuple(sorted((p.service, p.demand or "", p.reason) for p in report.plan.pending)),
                   tuple(sorted(report.stalled)),
                   tuple(sorted(a.id for a in report.plan.actions)))
        quiet = not acted and (waiting == self._told or not any(waiting))
        if not quiet:
            self._told = waiting
        tell = self.bus.announce if quiet else self.bus.publish
        tell(
            EventKind.PASS_FINISHED,
            message=f"pass {number} ({reason})",
            reason=reason,
            duration_s=round(self.clock.monotonic() - started, 3),
            actions=[a.id for r in report.passes for a in r.plan.actions],
            outcomes=counts,
            pending=[p.model_dump(mode="json", exclude_none=True) for p in report.plan.pending],
            stalled=dict(report.stalled),
            converged=report.converged,
            quiet=quiet and number > 1,
            **{"pass": number},
        )
        return report

    def _due_in(self, report: PassReport) -> tuple[str, float]:
        """When to look again if nothing else happens, and why."""
        runtime = self.runtime
        if any(i.state == "starting" for i in runtime.store.instances()):
            return "starting", STARTING_POLL_S
        due = ("liveness", liveness_s(self.profile))
        now = runtime.clock.now()
        for action in report.plan.actions:
            outcome = report.outcomes.get(action.id)
            if outcome is None or outcome.status != "deferred":
                continue
            backoff = runtime.store.get_backoff(action.service)
            if backoff.next_attempt_at is not None:
                wait = max(0.0, (backoff.next_attempt_at - now).total_seconds()) + 0.05
                if wait < due[1]:
                    due = ("backoff", wait)
        return due

    async def _next(self, triggers: asyncio.Queue[ProfileChange | Resync], due: tuple[str, float]) -> str | None:
        """Wait for the next reason to pass (the profile in force may change meanwhile); None when stopping."""
        why, timeout = due
        deadline = self.clock.monotonic() + timeout
        while True:
            now = self.clock.monotonic()
            if self._held is not None and now >= self._held.until:
                self._apply_held()
                return "profile"
            limit = deadline if self._held is None else min(deadline, self._held.until)
            getting = asyncio.ensure_future(triggers.get())
            woken = asyncio.ensure_future(self.runtime.wait_woken(max(0.0, limit - now)))
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                done, _ = await asyncio.wait({getting, woken, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (getting, woken, stop):
                    task.cancel()
            if stop in done:
                return None
            if getting in done:
                event = getting.result()
                if isinstance(event, Resync):
                    return "resync"
                accepted = self._accept(event)
                if accepted is not None and self._hold(accepted, event):
                    accepted = None  # a removal waits for the file to settle
                if accepted is not None:
                    self._held = None
                    self._reloaded(accepted, event)
                    self.profile = accepted
                    return "profile"
                if woken in done and woken.result():  # the wake was taken (cleared) in this round: keep it
                    return "wake"
                continue
            if woken.result():
                return "wake"
            if self._held is not None and self.clock.monotonic() >= self._held.until:
                continue  # the held edit settled: applied at the top of the loop
            return why

    def _accept(self, change: ProfileChange) -> Profile | None:
        """The changed profile when it may be applied; else report why not (the current one stays)."""
        keeping = f"profile {self.profile.name}"
        path = str(change.path) if change.path else self.where
        if change.profile is None:
            first = change.diagnostics[0] if change.diagnostics else None
            self.runtime.profile_problem = f"profile rejected: {first or path + ' is invalid'}" + (
                f" (and {len(change.diagnostics) - 1} more)" if len(change.diagnostics) > 1 else "") + \
                f"; {keeping} stays in force until a good save"
            self.bus.publish(EventKind.PROFILE_REJECTED, message=f"{path} is invalid; nothing changed", path=path,
                             keeping=keeping, diagnostics=diagnostics_data(change.diagnostics))
            return None
        self.bus.redactor.learn(change.profile.expansions)  # its values never reach an event
        try:
            check_profile_guard(change.profile, self.allow_empty)
        except GuardError as exc:
            self.runtime.profile_problem = f"profile rejected: {exc}; {keeping} stays in force"
            self.bus.publish(EventKind.PROFILE_REJECTED, message=str(exc), path=path, keeping=keeping, diagnostics=[])
            return None
        self.runtime.profile_problem = None
        return change.profile

    def _reloaded(self, profile: Profile, change: ProfileChange) -> None:
        path = str(change.path) if change.path else self.where
        self.bus.publish(EventKind.PROFILE_RELOADED, message=f"{path}: profile {profile.name}", path=path,
                         profile=profile.name, digest=change.digest[:16],
                         **({"detected": change.note} if change.note else {}))

    def _hold(self, profile: Profile, change: ProfileChange) -> bool:
        """Hold an edit that removes services until the file has been stable for a settle window.

        An editor or a tool that writes the file in two chunks shows the first
        half for a moment — a valid profile that lacks what the second half
        holds. Applying it would stop those services, then start them again.
        So an edit that removes services waits :data:`REMOVAL_SETTLE_S` after
        the last change of the file (twice that when it removes more than half
        of what runs); any newer save replaces it. Additions and changes apply
        at once.
        """
        removed = sorted(set(self.profile.services) - set(profile.services))
        if not removed:
            return False
        running = {i.service for i in self.runtime.store.instances()}
        settle = REMOVAL_SETTLE_S * (2 if running and len(running & set(removed)) * 2 > len(running) else 1)
        self._held = Held(profile, change, self.clock.monotonic() + settle)
        path = str(change.path) if change.path else self.where
        self.bus.publish(EventKind.PROFILE_HELD, message=f"{path}: profile {profile.name} removes "
                         f"{', '.join(removed)}; applied once the file has not changed for {settle:g} s",
                         path=path, profile=profile.name, removes=removed, settle_s=settle)
        return True

    def _apply_held(self) -> None:
        assert self._held is not None
        held, self._held = self._held, None
        self._reloaded(held.profile, held.change)
        self.profile = held.profile


def liveness_s(profile: Profile) -> float:
    """How often to look at the host while services run: their shortest probe interval."""
    intervals = [s.probe_interval_s for s in profile.services.values() if s.managed is not None]
    return max(MIN_LIVENESS_S, min(intervals)) if intervals else 3600.0


__all__ = ["CANCELLED", "Companion", "Loop", "Started", "diagnostics_data", "liveness_s"]
