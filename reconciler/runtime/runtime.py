"""The runtime: observe → plan → apply, one pass at a time, with crash recovery.

A pass (:meth:`Runtime.reconcile`) reads the inventory from the store,
expires leases whose time is up, observes the host, tidies the inventory
against what it saw (:mod:`.inventory`: the dead pruned, finished starts
promoted), plans, holds back the starts of services that are backing off and
whatever needs them (:mod:`.backoff`), and runs the rest of the plan's
``requires`` DAG (:mod:`.executor`, :mod:`.actions`). Passes never overlap.
On a quiet, converged host a pass first asks :mod:`.steady` whether the last
full pass's answer still holds (its instances, probes and GPUs looked at
again), and reports that answer when it does.
:meth:`Runtime.recover` runs once at startup (:mod:`.recovery`);
:meth:`Runtime.converge` repeats passes while they make progress.

One clock (:class:`~reconciler.core.clock.Clock`), injected: its wall time is
the planner's ``now`` and stamps the store (leases, backoff, idle times); its
monotonic time and sleep time the waits (health, deadlines). Tests pass fakes.

Between passes and during them others read the runtime through
:meth:`Runtime.last_pass` (what the last pass saw and planned) and
:meth:`Runtime.planning` (the plan of the pass in flight), change leases and
demands through :attr:`Runtime.ledger` (in memory, written through; no lock:
see :mod:`.ledger` for how a pass and a grant stay out of each other's way),
ask for a pass with :meth:`Runtime.wake`, and wait for passes and grants through
:attr:`Runtime.passed` and :attr:`Runtime.grants` (:mod:`.passes`). The
model gateway records its traffic in :attr:`Runtime.traffic` (the API shows
it) and Ollama's ``keep_alive`` in :attr:`Runtime.keep_alive`, which each
pass plans with (:mod:`.keepalive`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

from reconciler.core.backoff import DEFAULT_POLICY, BackoffPolicy
from reconciler.core.clock import Clock
from reconciler.core.events import EventKind
from reconciler.core.plan import Action, Plan
from reconciler.core.planner import plan as make_plan
from reconciler.core.profile import Profile
from reconciler.core.redaction import redact_plan
from reconciler.core.report import Outcome, PassReport
from reconciler.core.snapshot import Snapshot
from reconciler.errors import ReconcilerError
from reconciler.host.gpu import GpuBackend
from reconciler.host.observer import Observer
from reconciler.host.probes import Prober
from reconciler.runtime import inventory, recovery
from reconciler.runtime.actions import Actuator
from reconciler.runtime.backoff import hold_back
from reconciler.runtime.driverset import DriverSet
from reconciler.runtime.events import EventBus
from reconciler.runtime.executor import Executor
from reconciler.runtime.health import HealthWaiter
from reconciler.runtime.keepalive import KeepAlive
from reconciler.runtime.ledger import Ledger
from reconciler.runtime.lifecycle import DEFAULT_MEMORY_TIMEOUT_S, Lifecycle
from reconciler.runtime.passes import GrantWatch, LastPass, PassSignal
from reconciler.runtime.pulls import Pulls
from reconciler.runtime.steady import Steady
from reconciler.runtime.traffic import Traffic
from reconciler.store.base import Store, StoredState

QUICK_ACTION_TIMEOUT_S = 30.0  # adopt, lease, release: store writes only
DRIVER_MARGIN_S = 130.0  # launching (docker run may pull an image), SIGKILL confirmation
STARTING_POLL_S = 0.2  # converge: how often to look again while an instance is still starting


class Runtime:
    """Applies profiles to this host. One instance per state directory; call :meth:`aclose` at the end."""

    def __init__(
        self,
        *,
        store: Store,
        gpu_backend: GpuBackend,
        state_dir: Path,
        clock: Clock,
        node: str = "local",
        sim: bool = False,
        events: EventBus | None = None,
        drivers: DriverSet | None = None,
        policy: BackoffPolicy = DEFAULT_POLICY,
        memory_timeout_s: float = DEFAULT_MEMORY_TIMEOUT_S,
    ):
        self.store = store
        self.gpu_backend = gpu_backend
        self.state_dir = Path(state_dir)
        self.node = node
        self.sim = sim
        self.clock = clock
        self.events = events or EventBus(store, clock=clock)
        self.redactor = self.events.redactor  # learns every profile's expansions; shared with the bus
        self.drivers = drivers or DriverSet.default(self.state_dir, clock)
        self.ledger = Ledger(store, clock)
        self.prober = Prober()
        self.lifecycle = Lifecycle(
            store=store, drivers=self.drivers, gpu_backend=gpu_backend, events=self.events,
            health=HealthWaiter(self.prober, clock=clock.monotonic, sleep=clock.sleep), clock=clock, sim=sim,
            policy=policy, memory_timeout_s=memory_timeout_s, redactor=self.events.redactor,
        )
        self.passed = PassSignal()  # set as each pass finishes
        self.grants = GrantWatch()  # set as a pass grants a watched demand
        self.traffic = Traffic()  # the model gateway's requests, per model (shown by the API)
        self.keep_alive = KeepAlive()  # Ollama keep_alive per instance, from the gateway's requests
        self.pulls = Pulls(self.events, self.wake, clock.monotonic)  # models pulled into an Ollama (pull: true)
        self._last: LastPass | None = None
        self._planning: Plan | None = None
        self.profile_problem: str | None = None  # the last saved edit's rejection, until a good save (the loop's)
        self.transient_holds: set[str] = set()  # held stopped for this process only (`down` without a server)
        self._observer: Observer | None = None
        self._pass_lock = asyncio.Lock()
        self._woken = asyncio.Event()
        self._deadline: float | None = None
        self._probe_misses: dict[tuple[str, int | None], int] = {}  # failed probes in a row (inventory)
        self.steady = Steady(self.prober, gpu_backend, clock.monotonic)  # a quiet pass reuses the last answer

    def last_pass(self) -> LastPass | None:
        """What the last pass observed and planned (None before the first)."""
        return self._last

    def state(self) -> StoredState:
        """The inventory from the store, leases and demands from the ledger (in memory, the truth); the idle
        times of memory-only leases are written first, so the inventory read has them."""
        self.ledger.flush()
        return StoredState(instances=self.store.instances(), leases=self.ledger.leases(),
                           demands=self.ledger.demands())

    def planning(self) -> Plan | None:
        """The plan of the pass in flight, from the moment it is made until that pass ends (else None):
        its starts hold memory that a VRAM lease must not take meanwhile."""
        return self._planning

    # --- startup ------------------------------------------------------------------

    async def recover(self) -> None:
        """Startup: resolve open intents, re-find our instances (invariant 5)."""
        async with self._pass_lock:
            await recovery.recover(self.lifecycle)

    # --- passes -------------------------------------------------------------------

    async def reconcile(self, profile: Profile, *, health_wait_s: float | None = None) -> PassReport:
        """One observe → plan → apply pass.

        ``health_wait_s``: starts stop waiting for health after this long (their
        outcome is ``deferred``, their instances stay ``starting``, and later
        passes promote or fail them), so that a slow start does not hold up the
        pass; by default a start waits up to its ``start_timeout_s``.
        """
        async with self._pass_lock:
            if health_wait_s is None:
                return await self._pass(profile)
            self._deadline = self.clock.monotonic() + health_wait_s
            try:
                return await self._pass(profile)
            finally:
                self._deadline = None

    async def _pass(self, profile: Profile) -> PassReport:
        store, now = self.store, self.clock.now()
        self.redactor.learn(profile.expansions)
        self.lifecycle.eviction_timeout_s = profile.eviction_timeout_s
        for lease in self.ledger.expire(now):
            self.events.publish(EventKind.LEASE_EXPIRED, service=lease.service, lease=lease.id, holder=lease.holder)
        ledger = self.ledger
        state = self.state()
        held = set(store.holds()) | self.transient_holds  # what an operator holds stopped (.controls)
        steady = await self.steady.reuse(profile, state.instances, len(state.leases), len(state.demands), held, now)
        if (steady is not None and self.steady.plan is not None and not ledger.leases() and not ledger.demands()
                and set(store.holds()) | self.transient_holds == held):
            # nothing changed (and no lease, demand or hold came while it looked): the last answer holds (.steady)
            plan = self.steady.plan
            self._last = LastPass(snapshot=steady, plan=plan)
            _, stalled = hold_back(plan, profile, store, steady.now)
            return self._report(profile, plan, steady, {}, stalled)
        self.steady.forget()
        observer = self._observer_for(profile)
        observed = await observer.observe(state.instances, state.leases, state.demands)
        snapshot = self.keep_alive.apply(await inventory.tidy(self.lifecycle, profile, observed, self._probe_misses))
        # leases and demands as they are now (grants go on while a pass observes); from here to publishing
        # the plan nothing awaits, so every grant is either seen by the planner or sees the plan's starts
        snapshot = snapshot.model_copy(update={"leases": ledger.leases(), "demands": ledger.demands()})
        held = set(store.holds()) | self.transient_holds  # read again: an operator may have held one meanwhile
        if held:
            snapshot = snapshot.model_copy(update={"held": sorted(held)})
        plan = self.pulls.after_plan(profile, snapshot, make_plan(profile, snapshot))
        self._planning = plan  # kept should the pass fail: its starts may have begun (the next plan replaces it)
        deferred, stalled = hold_back(plan, profile, store, snapshot.now)
        actuator = Actuator(self.lifecycle, self.ledger, profile, snapshot, self._deadline,
                            on_grant=self.grants.granted)
        executor = Executor(
            actuator, timeout_for=lambda a: self._timeout(profile, a), clock=self.clock.monotonic,
            on_start=self._on_start, on_finish=self._on_finish,
        )
        ran = await executor.run(a for a in plan.actions if a.id not in deferred)
        outcomes = {a.id: ran.get(a.id) or Outcome("deferred", deferred[a.id]) for a in plan.actions}
        outcomes = {k: replace(o, detail=self.redactor.text(o.detail)) for k, o in outcomes.items()}
        plan = redact_plan(plan, self.redactor)  # reasons may quote a launch spec an older profile expanded
        self._last, self._planning = LastPass(snapshot=snapshot, plan=plan), None
        if not outcomes:
            self.steady.remember(profile, snapshot, plan, observer.last_read, held)
        return self._report(profile, plan, snapshot, outcomes, stalled)

    def _report(self, profile: Profile, plan: Plan, snapshot: Snapshot, outcomes: dict[str, Outcome],
                stalled: dict[str, str]) -> PassReport:
        """The pass's event and report."""
        counts = {s: sum(1 for o in outcomes.values() if o.status == s)
                  for s in ("done", "failed", "skipped", "deferred")}
        # an uneventful pass is shown, never recorded: a watch passes every few seconds (and a start held back by
        # its backoff, pass after pass, is not an event either)
        tell = self.events.publish if any(o.status != "deferred" for o in outcomes.values()) else self.events.announce
        tell(EventKind.PASS, message=", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing to do",
             profile=profile.name, actions=len(plan.actions), pending=len(plan.pending), stalled=sorted(stalled),
             **counts)
        self.passed.finished()
        return PassReport(plan=plan, snapshot=snapshot, outcomes=outcomes, stalled=stalled)

    async def converge(self, profile: Profile, timeout_s: float) -> PassReport:
        """Passes until nothing more can be done now (pending may remain) or ``timeout_s`` passes.

        A pass that got something done is followed by another at once; one in
        which nothing could be done (everything deferred, or failing) ends
        it. While an instance is still ``starting``, it looks again every
        0.2 s. Starts stop waiting for health at the deadline (their
        instances stay ``starting`` for later passes).
        """
        deadline = self.clock.monotonic() + timeout_s
        history: list[PassReport] = []
        async with self._pass_lock:
            self._deadline = deadline
            try:
                while True:
                    report = await self._pass(profile)
                    progress = any(o.ok for o in report.outcomes.values())
                    starting = not report.plan.actions and any(
                        i.state == "starting" for i in self.store.instances())
                    if self.clock.monotonic() >= deadline or not (progress or starting):
                        return replace(report, history=tuple(history))
                    history.append(report)
                    if starting and not progress:
                        await self.clock.sleep(STARTING_POLL_S)
            finally:
                self._deadline = None

    def _timeout(self, profile: Profile, action: Action) -> float:
        if action.kind in ("adopt", "lease", "release"):
            return QUICK_ACTION_TIMEOUT_S
        stop = profile.eviction_timeout_s + self.lifecycle.memory_timeout_s + DRIVER_MARGIN_S
        if action.kind in ("stop", "evict"):
            return stop
        start = profile.services[action.service].start_timeout_s + DRIVER_MARGIN_S
        return start + (stop if action.kind == "restart" else 0)

    def _on_start(self, action: Action, _: Outcome | None) -> None:
        self.events.publish(EventKind.ACTION_STARTED, service=action.service, action=action.id,
                            action_kind=action.kind, message=action.reason)

    def _on_finish(self, action: Action, outcome: Outcome | None) -> None:
        assert outcome is not None
        self.events.publish(EventKind.ACTION_FINISHED, service=action.service, action=action.id,
                            action_kind=action.kind, status=outcome.status, duration_s=round(outcome.duration_s, 3),
                            message=outcome.detail)

    def _observer_for(self, profile: Profile) -> Observer:
        if self._observer is None:
            self._observer = Observer(profile, self.gpu_backend, node=self.node, clock=self.clock,
                                      prober=self.prober)
        else:
            self._observer.update_profile(profile)
        return self._observer

    # --- the loop's hooks -----------------------------------------------------------

    def exclusive(self) -> asyncio.Lock:
        """The lock every pass holds: ``async with runtime.exclusive():`` to change an instance's record between
        passes (the operator's ``restart``: a pass must not write back an older copy over it). The lease path
        never takes it (:mod:`.ledger`: fences instead)."""
        return self._pass_lock

    def wake(self) -> None:
        """Ask the loop for a pass soon (same thread as the event loop)."""
        self._woken.set()

    async def wait_woken(self, timeout_s: float | None = None) -> bool:
        """Wait until :meth:`wake` is called (True) or ``timeout_s`` passes on the clock (False); clears the request."""
        if not self._woken.is_set():
            woken = asyncio.ensure_future(self._woken.wait())
            waits = {woken} if timeout_s is None else {woken, asyncio.ensure_future(self.clock.sleep(timeout_s))}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
        if not self._woken.is_set():
            return False
        self._woken.clear()
        return True

    async def aclose(self) -> None:
        """Cancel the model pulls in progress, close the probe client and the GPU backend; the instances keep
        running."""
        await self.pulls.aclose()
        with contextlib.suppress(ReconcilerError):  # a failing store: nothing more can be kept
            self.ledger.flush()
        self.events.close()
        await self.prober.aclose()
        self.gpu_backend.close()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
