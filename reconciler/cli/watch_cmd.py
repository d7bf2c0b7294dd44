"""``reconciler watch``: keep the host converged to a profile, and re-apply on every save.

    reconciler watch (--profile FILE | --profiles DIR) [--gpu nvml|auto|sim:…]
                     [--state-dir DIR] [--node NAME] [--resync S]
                     [--events text|json] [--allow-empty]
                     [--api [HOST:PORT]] [--token-file FILE]

``--api`` also serves the HTTP API and dashboard (:mod:`reconciler.api`) in
this process, on the same event loop; ``reconciler serve`` is the same with
the API on by default. The API reads the profile in force (``self.profile``)
and is stopped before the runtime closes.

Start-up: the profile is loaded (``--profiles DIR`` picks one by GPU size,
see :mod:`reconciler.runtime.watcher`); an invalid one exits 1 with its
``file:line:col`` errors and touches nothing, and so does a profile without
services unless ``--allow-empty`` (invariant 3). Then the runtime recovers
(finds its instances again, resolves what a crash left half done) and the
loop runs a pass — observe, plan, apply — at start, on every saved change of
the profile, every ``--resync`` seconds, when the runtime asks for one
(``wake``), and every ``probe_interval_s`` of the profile's services while
any runs (a dead service is noticed and restarted, subject to backoff).

A saved edit that is invalid, or that empties ``services`` without
``--allow-empty``, is rejected with the reason and the last good profile
stays in force (invariant 2). SIGINT or SIGTERM ends the loop and exits 0,
*leaving the services running*: a later ``watch`` on the same state
directory finds them again. One reconciler per state directory: ``watch`` holds
the lock that ``apply`` also takes (:mod:`reconciler.runtime.lock`).

Events go to stdout, one per line: readable text, or with ``--events json``
one JSON object per line (``kind`` plus data: ``watch.started``,
``pass.started``, ``pass.finished`` with ``duration_s``, the runtime's action
events, ``profile.reloaded``, ``profile.rejected`` with ``diagnostics``,
``watch.stopped``). Text mode leaves out passes that found nothing to do.

``RECONCILER_PYTHON`` is set to this Python (``sys.executable``) when unset,
before the profile is loaded, so a profile can run Python programs shipped
with the reconciler (the demo, tests) with ``exec_path: "${RECONCILER_PYTHON}"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from reconciler.core.profile import Profile
from reconciler.errors import Diagnostic, GuardError, ProfileError, ReconcilerError
from reconciler.host.gpu import SPEC_HELP, GpuBackend, open_gpu_backend
from reconciler.host.sim import SimBackend
from reconciler.runtime import EventBus, PassReport, Runtime, check_profile_guard
from reconciler.runtime.lock import StateLock
from reconciler.runtime.watcher import (
    ProfileChange,
    ProfileDirectory,
    ProfileFile,
    ProfileWatcher,
    Resync,
    smallest_gpu_total,
)
from reconciler.store import default_state_dir, open_store

PYTHON_ENV = "RECONCILER_PYTHON"
DEFAULT_LISTEN = "127.0.0.1:7700"  # the API's (reconciler.api.auth.DEFAULT_LISTEN; not imported: watch stays light)
PASS_BUDGET_S = 2.0  # a pass stops waiting for slow starts after this; later passes finish them
STARTING_POLL_S = 0.3  # how soon to look again while an instance is still starting
STOP_GRACE_S = 5.0  # after SIGINT/SIGTERM, a pass in flight gets this long (plus eviction_timeout_s)
MIN_LIVENESS_S = 0.25
RETRY_AFTER_ERROR_S = 5.0  # after a pass that raised
CANCELLED = object()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="keep the host converged to a profile; re-apply on every save",
        description="Converge the host to the profile, then again on every saved change, every --resync "
        "seconds and whenever a service dies. Ctrl-C exits and leaves the services running.",
    )
    add_arguments(parser)
    parser.add_argument(
        "--api", nargs="?", const=DEFAULT_LISTEN, default=None, metavar="HOST:PORT",
        help=f"also serve the HTTP API and dashboard (default address {DEFAULT_LISTEN}); see `reconciler serve`",
    )
    add_token_argument(parser)
    parser.set_defaults(func=run)


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file", metavar="FILE",
        help="a file holding the API token: mutating calls then need 'Authorization: Bearer <token>' "
        "(required to listen off loopback)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The watch loop's options (``watch`` and ``serve`` share them)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", metavar="FILE", help="the profile (YAML)")
    source.add_argument(
        "--profiles", metavar="DIR", help="a directory of profiles: use the largest that fits the GPU (CPU profile without one)"
    )
    parser.add_argument("--gpu", default="auto", metavar="SPEC", help=f"GPU backend; {SPEC_HELP} (default: auto)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (default: the reconciler's own)")
    parser.add_argument("--node", default="local", help="node name (default: local)")
    parser.add_argument(
        "--resync", type=_positive, default=30.0, metavar="S", help="observe and plan again every S seconds (default: 30)"
    )
    parser.add_argument("--events", choices=("text", "json"), default="text", help="event output (default: text)")
    parser.add_argument(
        "--allow-empty", action="store_true", help="accept a profile without services (it stops everything)"
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault(PYTHON_ENV, sys.executable)
    return asyncio.run(Watch(args).main())


class Printer:
    """Writes events to stdout as text lines or JSON lines, flushing each."""

    def __init__(self, fmt: str, out: TextIO | None = None):
        self.fmt = fmt
        self._out = out

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def __call__(self, event: dict[str, Any]) -> None:
        if self.fmt == "json":
            line = json.dumps(event, default=str, ensure_ascii=False)
        else:
            line = format_text(event)
            if line is None:
                return
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except BrokenPipeError:  # `watch | head`: the reader is gone; keep reconciling
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())


_SYMBOLS = {"done": "✓", "failed": "✗", "skipped": "-", "deferred": "…"}
_SILENT = {"pass.started", "pass"}  # the runtime's own "pass" is summed up by pass.finished


def format_text(event: dict[str, Any]) -> str | None:
    """One readable line (or a few) for an event; None when text mode leaves it out."""
    kind = event.get("kind", "?")
    ts = str(event.get("ts", ""))[11:19]
    message = event.get("message") or ""
    if kind in _SILENT or (kind == "pass.finished" and event.get("quiet")):
        return None
    if kind == "watch.started":
        return (f"{ts} watching {event.get('path')}: profile {event.get('profile')}, GPU {event.get('gpu')}, "
                f"state {event.get('state_dir')}" + (f" ({event['detected']})" if event.get("detected") else ""))
    if kind == "profile.rejected":
        lines = [f"{ts} profile rejected, {event.get('keeping') or 'the last good profile'} stays: {message}"]
        lines += [f"    {d['file']}:{d['line']}:{d['col']}: {d['message']}" for d in event.get("diagnostics", [])]
        return "\n".join(lines)
    if kind == "profile.reloaded":
        return f"{ts} profile reloaded: {message}" + (f" ({event['detected']})" if event.get("detected") else "")
    if kind == "action.started":
        return f"{ts}   → {event.get('action')}: {message}"
    if kind == "action.finished":
        status = event.get("status", "?")
        return f"{ts}   {_SYMBOLS.get(status, '?')} {event.get('action')} {status} in {event.get('duration_s')} s: {message}"
    if kind == "pass.finished":
        counts = event.get("outcomes") or {}
        bits = [", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing to do"]
        bits += [f"pending {p['service']}: {p['reason']}" for p in event.get("pending", [])]
        bits += [f"stalled {name}: {why}" for name, why in (event.get("stalled") or {}).items()]
        return f"{ts} pass {event.get('pass')} ({event.get('reason')}) in {event.get('duration_s')} s: " + "; ".join(bits)
    if kind in ("watch.stopped", "watch.degraded", "pass.failed"):
        return f"{ts} {message}"
    detail = message or " ".join(
        f"{k}={v}" for k, v in event.items() if k not in ("id", "ts", "kind", "service", "message"))
    return f"{ts}     {kind}: {detail}"


def diagnostics_data(diagnostics: tuple[Diagnostic, ...] | list[Diagnostic]) -> list[dict[str, Any]]:
    return [{"file": d.file, "line": d.line, "col": d.col, "message": d.message} for d in diagnostics]


class WatchBus(EventBus):
    """The runtime's bus, plus events for the output only (not written to the store's event log).

    A watch passes every few seconds; logging each uneventful pass would grow
    the store's log forever, so ``pass.started`` and passes that found nothing
    to do are only shown, never recorded.
    """

    # ``announce`` (EventBus) shows an event without recording it.


class Watch:
    """The watch loop: one instance per command invocation."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.print = Printer(args.events)
        self.state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.grace_s = STOP_GRACE_S
        self.signal_name: str | None = None
        self.passes = 0
        self.profile: Profile | None = None  # the profile in force (the API reads it)

    async def main(self) -> int:
        api = self._api()
        backend, watcher, first = self._load()
        profile = self.profile = first.profile
        assert profile is not None
        lock = StateLock(self.state_dir, purpose="watch")
        lock.acquire()
        if api is not None:
            try:
                api.bind()
            except BaseException:
                lock.release()
                raise
        store = open_store(self.state_dir)
        bus = WatchBus(store)
        runtime = Runtime(
            store=store,
            gpu_backend=backend,
            state_dir=self.state_dir,
            node=self.args.node,
            sim=isinstance(backend, SimBackend),
            events=bus,
        )
        subscription = bus.subscribe()
        printing = asyncio.ensure_future(self._print_events(subscription))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            bus.publish(
                "watch.started",
                message=f"profile {profile.name} ({first.path}), GPU {backend.name}, state {self.state_dir}",
                profile=profile.name,
                path=str(first.path),
                gpu=backend.name,
                state_dir=str(self.state_dir),
                pid=os.getpid(),
                **({"detected": first.note} if first.note else {}),
            )
            if api is not None:
                await api.start(runtime, lambda: self.profile)
            await self._loop(runtime, watcher, profile, bus)
            bus.publish("watch.stopped", message=f"{self.signal_name or 'stopped'}: services left running",
                        signal=self.signal_name)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            watcher.stop()
            try:
                if api is not None:
                    await api.stop()
                await runtime.aclose()
            finally:
                subscription.close()
                await printing
                store.close()
                lock.release()
        return 0

    def _api(self):
        """The API server when ``--api``/``serve`` asks for one (refused off loopback without a token)."""
        listen = getattr(self.args, "api", None)
        token_file = getattr(self.args, "token_file", None)
        if not listen:
            if token_file:
                raise GuardError("--token-file is for the API: add --api (or use `reconciler serve`)")
            return None
        from reconciler.api.auth import parse_listen, read_token  # the API's imports only when it is wanted
        from reconciler.api.server import ApiServer

        return ApiServer(parse_listen(listen), read_token(token_file) if token_file else None)

    def _load(self) -> tuple[GpuBackend, ProfileWatcher, ProfileChange]:
        """The GPU backend, the watcher and the first profile; exit 1 (raise) when the profile is not usable."""
        args = self.args
        if args.profiles:
            backend = open_gpu_backend(args.gpu)
            source = ProfileDirectory(args.profiles, smallest_gpu_total(backend.read))
        else:
            source = ProfileFile(args.profile)
        watcher = ProfileWatcher(source, resync_s=args.resync)
        first = watcher.load()
        if first.profile is None:
            if args.events == "json":  # machines read stdout; the located lines go to stderr as usual
                self.print({"kind": "profile.rejected", "message": "invalid profile at start-up; nothing changed",
                            "diagnostics": diagnostics_data(first.diagnostics)})
            raise ProfileError(list(first.diagnostics))
        check_profile_guard(first.profile, args.allow_empty)
        if not args.profiles:
            backend = open_gpu_backend(args.gpu, default_sim_mb=first.profile.vram_total_mb)
        return backend, watcher, first

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            self.hurry.set()  # a second signal: cut the pass in flight short
        self.signal_name = sig.name
        self.stopping.set()

    async def _print_events(self, subscription) -> None:
        async for event in subscription:
            self.print(event)

    async def _loop(self, runtime: Runtime, watcher: ProfileWatcher, profile: Profile, bus: WatchBus) -> None:
        triggers: asyncio.Queue[ProfileChange | Resync] = asyncio.Queue()
        watching = asyncio.ensure_future(self._watch(watcher, triggers, bus))
        try:
            if await self._run(runtime.recover()) is CANCELLED:
                return
            reason: str | None = "start"
            while reason is not None and not self.stopping.is_set():
                report = await self._pass(runtime, profile, reason, bus)
                if report is CANCELLED:
                    return
                due = self._due_in(runtime, profile, report) if report is not None else ("retry", RETRY_AFTER_ERROR_S)
                reason, profile = await self._next(runtime, triggers, profile, bus, due)
                self.profile = profile
        finally:
            watcher.stop()
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    async def _watch(self, watcher: ProfileWatcher, triggers: asyncio.Queue, bus: EventBus) -> None:
        while not self.stopping.is_set():
            try:
                async for event in watcher.events():
                    triggers.put_nowait(event)
                return
            except Exception as exc:  # the directory went away, inotify limits…: retry, services unaffected
                retry = min(self.args.resync, 5.0)
                bus.publish("watch.degraded", message=f"cannot watch the profile ({exc}); retrying in {retry:g} s")
                await asyncio.sleep(retry)

    async def _run(self, coro) -> Any:
        """Await ``coro``; after a stop signal it gets ``grace_s`` more (a second signal: none), then is cancelled.

        A cancelled pass is what a crash would leave: its intents are open, and
        the next ``watch`` resolves them (invariant 5). Returns ``CANCELLED`` then.
        """
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self.stopping.wait())
        hurry = asyncio.ensure_future(self.hurry.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task, hurry}, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return CANCELLED
            return task.result()
        finally:
            stop.cancel()
            hurry.cancel()

    async def _pass(self, runtime: Runtime, profile: Profile, reason: str, bus: WatchBus) -> Any:
        """One bounded pass with its events: the report, None when it failed, or ``CANCELLED``.

        A failing pass (the GPU or the store unreadable for a moment, or a bug)
        is reported as ``pass.failed`` and retried later; the services are not
        touched by it, so watching goes on.
        """
        self.passes += 1
        number = self.passes
        bus.announce("pass.started", message=f"pass {number} ({reason})", reason=reason, profile=profile.name,
                     **{"pass": number})
        started = time.monotonic()
        self.grace_s = STOP_GRACE_S + profile.eviction_timeout_s
        try:
            report = await self._run(runtime.converge(profile, PASS_BUDGET_S))
        except Exception as exc:  # noqa: BLE001 - a daemon reports, waits, and tries again
            if not isinstance(exc, ReconcilerError):
                traceback.print_exc(file=sys.stderr)
            bus.publish("pass.failed", message=f"pass {number} ({reason}) failed: {exc}; retrying in "
                        f"{RETRY_AFTER_ERROR_S:g} s", reason=reason, error=type(exc).__name__,
                        duration_s=round(time.monotonic() - started, 3), **{"pass": number})
            return None
        if report is CANCELLED:
            return CANCELLED
        counts = {k: v for k, v in report.counts().items() if v}
        quiet = not any(r.plan.actions for r in report.passes) and not report.plan.pending and not report.stalled
        (bus.announce if quiet else bus.publish)(
            "pass.finished",
            message=f"pass {number} ({reason})",
            reason=reason,
            duration_s=round(time.monotonic() - started, 3),
            actions=[a.id for r in report.passes for a in r.plan.actions],
            outcomes=counts,
            pending=[p.model_dump(mode="json", exclude_none=True) for p in report.plan.pending],
            stalled=dict(report.stalled),
            converged=report.converged,
            quiet=quiet and number > 1,
            **{"pass": number},
        )
        return report

    def _due_in(self, runtime: Runtime, profile: Profile, report: PassReport) -> tuple[str, float]:
        """When to look again if nothing else happens, and why."""
        if any(i.state == "starting" for i in runtime.store.instances()):
            return "starting", STARTING_POLL_S
        due = ("liveness", self._liveness_s(profile))
        now = runtime.clock()
        for action in report.plan.actions:
            if report.outcomes.get(action.id, None) is None or report.outcomes[action.id].status != "deferred":
                continue
            backoff = runtime.store.get_backoff(action.service)
            if backoff.next_attempt_at is not None:
                wait = max(0.0, (backoff.next_attempt_at - now).total_seconds()) + 0.05
                if wait < due[1]:
                    due = ("backoff", wait)
        return due

    async def _next(
        self, runtime: Runtime, triggers: asyncio.Queue, profile: Profile, bus: EventBus, due: tuple[str, float]
    ) -> tuple[str | None, Profile]:
        """Wait for the next reason to pass: (reason, profile in force); (None, _) when stopping."""
        why, timeout = due
        deadline = time.monotonic() + timeout
        while True:
            getting = asyncio.ensure_future(triggers.get())
            woken = asyncio.ensure_future(runtime.wait_woken(max(0.0, deadline - time.monotonic())))
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                done, _ = await asyncio.wait({getting, woken, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (getting, woken, stop):
                    task.cancel()
            if stop in done:
                return None, profile
            if getting in done:
                event = getting.result()
                if isinstance(event, Resync):
                    return "resync", profile
                accepted = self._accept(event, profile, bus)
                if accepted is not None:
                    return "profile", accepted
                if woken in done and woken.result():  # the wake was taken (cleared) in this round: keep it
                    return "wake", profile
                continue
            return ("wake" if woken.result() else why), profile

    def _accept(self, change: ProfileChange, current: Profile, bus: EventBus) -> Profile | None:
        """The changed profile when it may be applied; else report why not (the current one stays)."""
        keeping = f"profile {current.name}"
        path = str(change.path) if change.path else (self.args.profiles or self.args.profile)
        if change.profile is None:
            bus.publish("profile.rejected", message=f"{path} is invalid; nothing changed", path=path,
                        keeping=keeping, diagnostics=diagnostics_data(change.diagnostics))
            return None
        try:
            check_profile_guard(change.profile, self.args.allow_empty)
        except GuardError as exc:
            bus.publish("profile.rejected", message=str(exc), path=path, keeping=keeping, diagnostics=[])
            return None
        bus.publish("profile.reloaded", message=f"{path}: profile {change.profile.name}", path=path,
                    profile=change.profile.name, digest=change.digest[:16],
                    **({"detected": change.note} if change.note else {}))
        return change.profile

    @staticmethod
    def _liveness_s(profile: Profile) -> float:
        """How often to look at the host while services run: their shortest probe interval."""
        intervals = [s.probe_interval_s for s in profile.services.values() if s.managed is not None]
        return max(MIN_LIVENESS_S, min(intervals)) if intervals else 3600.0
