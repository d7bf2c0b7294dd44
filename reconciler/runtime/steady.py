"""Steady passes: a liveness pass on a converged, quiet host looks again without planning again.

A watch passes every ``probe_interval_s`` while services run, so that a
crashed or sick service is noticed within that interval. On a converged host
almost every such pass finds what the last one found, and a full pass — the
GPUs, a scan of every process's sockets for the listeners, the inventory
tidied against it, the planner — costs far more than the looking that is the
point of it (the demo, five services probed every second, idled at about 2 %
of a core).

So a pass first asks :class:`Steady` whether the last *full* pass's answer
still holds, and when it does, that answer is the pass's: same plan (empty),
same snapshot, at the new ``now``. It holds only when all of this is true:

* the last full pass planned nothing and left nothing pending, under the same
  profile (the very object: a reload is a new one), at most
  :data:`FULL_EVERY_S` ago, and every running instance with a probe answered
  it healthy (a failing probe counts towards ``failure_threshold`` only in a
  full pass);
* nothing in it depends on the clock: no lease and no demand (the ledger is
  read now, not the old snapshot), no instance of a service that stops when
  idle (``idle_stop_after_s``) or with an Ollama ``keep_alive`` — their
  deadlines are the planner's to see — and no instance starting;
* the inventory and the operator's holds are as that pass left them, and every
  instance is one the identity rule can check (a pid and its start time, no
  container);
* and, looked at again now: every instance's process is still the one that
  started (``pid`` and ``create_time``, :mod:`reconciler.core.identity`), every
  probe that is due answers exactly as it did, and the GPUs read exactly as
  they did.

**Each service at its own interval.** The passes come every smallest
``probe_interval_s`` of the profile, but a service is probed in a steady
pass only when its own ``probe_interval_s`` has passed since its last probe
(within half a pass: :func:`_due`); until then its last answer stands. The
demo's Ollama (the default 5 s) was probed every second beside services of
1 s, and a probe is a TCP connection set up and torn down: much of its cost
is the kernel's, so fewer of them is what makes probing cheaper. A process
that died is still seen at every pass (its pid), and a full pass probes
every service.

**Only what runs is probed.** A steady pass probes the services that have an
instance; the port of one that does not run (the demo's ``tts``, not
``always_on``, nobody asked for it) has no health to watch, and what its
probe finds — something else started listening there, an Ollama to adopt —
is the full pass's to see, at least every :data:`FULL_EVERY_S`. It was a
refused connection every second.

**Probes, then the GPUs.** The GPU read runs in a worker thread; run while
the probes' answers come in, the two threads handed the interpreter's lock
back and forth tens of times a pass. The probes go first now, then the read,
and the pass takes about a millisecond longer. The identity check computes
start times from the boot time the basis read (:func:`~reconciler.host.processes.boot_time`)
instead of reading ``/proc/stat`` again for every instance.

Anything else — a failed probe, a process gone, memory that moved, an edit, a
lease, a wake — and the pass is a full one, as before. The pass's cadence and
its events do not change; only the work behind a pass that would have found
nothing does. A full pass still runs at least every :data:`FULL_EVERY_S`, so
what only a full observation shows (a new listener on a running service's
port, an adopted Ollama's ``/api/ps``) is seen as it was at a resync.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from reconciler.core.identity import same_start
from reconciler.core.plan import Plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Gpu, Instance, Snapshot
from reconciler.host.gpu import GpuBackend
from reconciler.host.observer import probe_targets
from reconciler.host.probes import Prober, Target
from reconciler.host.processes import boot_time, start_time

FULL_EVERY_S = 10.0  # a full pass at least this often, however quiet the host


@dataclass(frozen=True)
class Basis:
    """What a full pass that planned nothing saw: the answer a steady pass may reuse."""

    profile: Profile
    snapshot: Snapshot
    plan: Plan
    gpus: list[Gpu]  # the backend's read, before any attribution
    holds: frozenset[str]
    at: float  # monotonic
    targets: dict[str, Target]  # what to probe (the profile's, computed once)
    intervals: dict[str, float]  # each target's probe_interval_s
    slack: float  # half the pass cadence (the smallest interval): a probe due that soon is made now
    boot: float | None  # the boot time that pass read (None: no /proc), for the start times of its pids


class Steady:
    """Remembers the last quiet full pass and answers whether a pass may reuse it."""

    def __init__(self, prober: Prober, gpu_backend: GpuBackend, monotonic: Callable[[], float]):
        self.prober = prober
        self.gpu_backend = gpu_backend
        self.monotonic = monotonic
        self._basis: Basis | None = None
        self._probed: dict[str, float] = {}  # service → when (monotonic) it was last probed
        self.reused = 0  # passes answered from the basis (for tests and curiosity)
        self.probes = 0  # probes made by steady passes (for tests and curiosity)

    def forget(self) -> None:
        self._basis = None

    def remember(self, profile: Profile, snapshot: Snapshot, plan: Plan, gpus: list[Gpu] | None,
                 holds: Iterable[str]) -> None:
        """After a full pass: keep it as the basis when it may serve as one, else forget the old one."""
        if gpus is None or plan.actions or plan.pending or not _clock_free(profile, snapshot) \
                or not _all_healthy(profile, snapshot):
            self._basis = None
            return
        targets = probe_targets(profile)
        intervals = {name: profile.services[name].probe_interval_s for name in targets}
        at = self.monotonic()
        self._basis = Basis(profile, snapshot, plan, gpus, frozenset(holds), at, targets, intervals,
                            min(intervals.values(), default=0.0) / 2, boot_time())
        self._probed = dict.fromkeys(targets, at)  # a full pass probes every service

    async def reuse(self, profile: Profile, instances: list[Instance], leases: int, demands: int,
                    holds: Iterable[str], now: datetime) -> Snapshot | None:
        """The snapshot to report for this pass when the basis still holds (looked at again now), else None."""
        basis = self._basis
        if (basis is None or basis.profile is not profile or leases or demands
                or self.monotonic() - basis.at >= FULL_EVERY_S or frozenset(holds) != basis.holds
                or instances != basis.snapshot.instances):
            return None
        if not all(_still_running(i, basis.boot) for i in instances):
            return None
        at = self.monotonic()
        running = {i.service for i in instances}
        due = {name: target for name, target in basis.targets.items()
               if name in running and _due(at - self._probed.get(name, -math.inf), basis.intervals[name], basis.slack)}
        probes = await self.prober.probe_all(due) if due else {}
        gpus = await asyncio.to_thread(self.gpu_backend.read)
        self.probes += len(probes)
        if gpus != basis.gpus or any(basis.snapshot.probes.get(name) != probe for name, probe in probes.items()):
            return None
        self._probed.update(dict.fromkeys(probes, at))
        self.reused += 1
        return basis.snapshot.model_copy(update={"now": now})

    @property
    def plan(self) -> Plan | None:
        return self._basis.plan if self._basis is not None else None


def _due(since_s: float, interval_s: float, slack_s: float) -> bool:
    """Whether a service last probed ``since_s`` ago is probed now: its interval has passed, or will have
    before the next pass is half over (passes come every smallest interval, a little late each)."""
    return since_s >= interval_s - slack_s


def _clock_free(profile: Profile, snapshot: Snapshot) -> bool:
    """Whether the planner's answer for ``snapshot`` stays the same as time passes (nothing has a deadline)."""
    if snapshot.leases or snapshot.demands:
        return False
    for instance in snapshot.instances:
        spec = profile.services.get(instance.service)
        if (spec is None or instance.state != "running" or instance.pid is None or instance.create_time is None
                or instance.container or instance.keep_alive_s is not None
                or (spec.idle_stop_after_s > 0 and not spec.always_on)):
            return False
    return True


def _all_healthy(profile: Profile, snapshot: Snapshot) -> bool:
    """Whether every instance whose service has a probe answered it healthy."""
    for instance in snapshot.instances:
        spec = profile.services.get(instance.service)
        probe = snapshot.probes.get(instance.service)
        if spec is None or (spec.probe_port is not None and (probe is None or not probe.healthy)):
            return False
    return True


def _still_running(instance: Instance, boot: float | None) -> bool:
    """Whether the process under the instance's pid is still the one it started (the identity rule; a
    zombie is not running). ``boot``: the boot time the basis read, so that ``/proc/stat`` is not read again
    for every instance at every pass (psutil reads it at every call). The kernel derives it from the wall
    clock, so it moves when the clock is stepped: start times computed from the basis's then differ from the
    recorded ones, the process looks like another, and the pass is a full one — the safe way to be wrong."""
    if instance.pid is None or instance.create_time is None:
        return False
    return same_start(instance.create_time, start_time(instance.pid, boot))


__all__ = ["FULL_EVERY_S", "Basis", "Steady"]
