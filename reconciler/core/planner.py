"""profile + snapshot → plan: the pure heart of the reconciler (DESIGN §3).

The planner walks the world once, in a fixed order, keeping a running per-GPU
``free`` figure (``free + freed ≥ need`` is enough; an exact fit is enough):

1. leases: expired ones and ones whose service left the profile are released;
2. adoption: a healthy listener on an ``adopt: true`` service's port becomes an
   instance, whether or not the service is otherwise wanted;
3. stops: our instances that are no longer wanted (adopted ones are released);
4. services in priority order (ties: dependencies first, then name): restart
   our instance if its launch spec changed (anything else about a service
   changes in place), or start it if it is wanted and missing (placing it,
   evicting less important ones if needed); then grant its demands
   (Ollama-style compatibility, ``max_concurrent``), restarting an idle
   instance for another model. A service evicted by a more important one
   earlier in the pass is left alone.

A service with ``gpu_count: N > 1`` spans N GPUs, ``max_mb`` on each: it is
placed on a set (:mod:`.gpu_sets`, through :func:`.placement.place_set`), its
actions carry ``gpus``, and everything above is kept per GPU — the running
``free`` figure, what a stop or an eviction gives back (a pair frees on
both its GPUs, so it is a candidate for either), what a restart in place
takes, the "every moment of an apply" requirements. An instance of ours
whose ``gpu_count`` was edited is stopped with the stops (step 3), when some
set could take it, and started again in step 4 like any start.

Anything wanted that cannot be reached goes to ``pending`` with a reason that
names the numbers. Everything the plan so far does lives in one
:class:`~.plan_state.PlanState`; granting demands is :mod:`.granting` (which
asks the planner to restart, place and evict through its methods), the
eviction choice :mod:`.eviction` (on one GPU) and :mod:`.gpu_sets` (on a set),
placement :mod:`.placement`, and "can this instance serve that request"
:mod:`.compatibility`. The planner imports
nothing that touches the host.
"""

from __future__ import annotations

from typing import TypedDict

from reconciler.core.clock import iso_utc
from reconciler.core.compatibility import model_bound
from reconciler.core.dependencies import Dependencies, topological_order
from reconciler.core.eviction import choose_eviction
from reconciler.core.gpu_sets import Spread
from reconciler.core.granting import DemandGranting, describe_launch_change
from reconciler.core.identity import same_start
from reconciler.core.interleavings import memory_moves, peak_extra
from reconciler.core.launch import launch_changed, launch_problem, launch_spec
from reconciler.core.placement import (
    EvictionOptions,
    EvictionPool,
    NoPlacement,
    Placement,
    place,
    place_set,
    refusal,
)
from reconciler.core.plan import ACTION_KINDS, Action, GpuSummary, Plan, action_id
from reconciler.core.plan_state import PlanState
from reconciler.core.profile import Profile, Service, is_ollama
from reconciler.core.redaction import Redactor, redact_plan
from reconciler.core.snapshot import Demand, Instance, Snapshot
from reconciler.core.wanted import compute_wanted, held_closure
from reconciler.core.world import World


class OnGpus(TypedDict):
    """The ``gpu`` and ``gpus`` fields of an action or instance."""

    gpu: int | None
    gpus: list[int] | None


OVER_COMMIT_PRIORITY = -1  # relieving an over-committed GPU may evict any priority (not always_on)


def plan(profile: Profile, snapshot: Snapshot) -> Plan:
    return Planner(profile, snapshot).run()


class Planner:
    """One plan: the world it reads, the state it builds (:class:`PlanState`), the stages that build it."""

    def __init__(self, profile: Profile, snapshot: Snapshot):
        self.profile = profile
        self.snapshot = snapshot
        self.world = World(profile, snapshot)
        self.deps = Dependencies(profile.services)
        self.state = PlanState()
        self.granting = DemandGranting(self)
        self.redactor = Redactor(profile.expansions)  # no reason ever shows an expanded value (invariant 8)
        self.effective: dict[str, int] = {}  # wanted service → priority, inherited by dependencies
        self.on_hold: dict[str, str] = {}  # service an operator holds stopped (or that needs one) → why

    # --- building blocks -----------------------------------------------------

    def held(self, service: str) -> int:
        """Leases the service holds once this plan is applied so far (kept + granted − released)."""
        kept = [lease for lease in self.world.leases_of(service) if lease.id not in self.state.released]
        return len(kept) + self.state.granted.get(service, 0)

    def reservation(self, service: str, gpu: int | None = None) -> int:
        """What ``service`` books on ``gpu`` (default: its first GPU) before the plan, after adoption."""
        gpu = self.state.gpu(service) if gpu is None else gpu
        view = self.world.gpus.get(gpu) if gpu is not None else None
        holder = view.holders.get(service) if view else None
        return holder.reservation if holder else 0

    def freed(self, service: str) -> int:
        """What stopping or evicting ``service`` frees on each of its GPUs (the least, where they differ)."""
        booked = [self.reservation(service, g) for g in self.state.gpus(service)]
        return min(booked) if booked else 0

    def frees_text(self, service: str) -> str:
        """``6144 MB on GPU 0``; ``20000 MB on each of GPUs 0 and 1`` for a service spanning several."""
        span = self.state.gpus(service)
        if len(span) <= 1:
            return f"{self.freed(service)} MB on " + (f"GPU {span[0]}" if span else "no GPU")
        booked = [self.reservation(service, g) for g in span]
        if len(set(booked)) == 1:
            return f"{booked[0]} MB on each of GPUs {_and(span)}"
        return _and([f"{mb} MB on GPU {g}" for g, mb in zip(span, booked, strict=True)])

    @staticmethod
    def on_gpus(gpus: tuple[int, ...]) -> OnGpus:
        """A record's ``gpu`` and ``gpus`` fields for ``gpus`` (``gpus`` only when there are several)."""
        return {"gpu": gpus[0] if gpus else None, "gpus": list(gpus) if len(gpus) > 1 else None}

    def allowed_gpus(self, spec: Service, demand: Demand | None = None) -> list[int]:
        gpus = [g for g in self.world.gpus if spec.gpus is None or g in spec.gpus]
        if demand is not None and demand.gpu is not None:
            gpus = [g for g in gpus if g == demand.gpu]
        return gpus

    def priority_of(self, service: str) -> int:
        """A service's priority for eviction: its own, or that of the most important wanted service needing it."""
        spec = self.profile.services.get(service)
        own = spec.priority if spec is not None else 0
        return min(own, self.effective.get(service, own))

    def unseen(self, gpu: int | None) -> bool:
        """Whether ``gpu`` is recorded (an instance or lease is on it) but the host does not show it."""
        return gpu is not None and gpu not in self.world.gpus

    def lost(self, gpus: tuple[int, ...]) -> int | None:
        """The first of ``gpus`` that the host does not show, if any."""
        return next((g for g in gpus if self.unseen(g)), None)

    @staticmethod
    def unseen_note(gpu: int | None) -> str:
        return f"GPU {gpu} cannot be seen on this host (NVML failing, or a --gpu spec that leaves it out)"

    def report_unseen(self) -> None:
        """A condition per instance on a GPU the host does not show: left as it is, and said so."""
        for name, instance in sorted(self.world.instances.items()):
            gpu = self.lost(instance.gpu_set)
            if (gpu is not None and name not in self.state.gone and name in self.profile.services
                    and not any(p.service == name and p.demand is None for p in self.state.pending)):
                self.state.wait(name, f"{name} runs on GPU {_ids(instance.gpu_set)}; {self.unseen_note(gpu)}: "
                                      f"nothing is started on or evicted from it, and {name} is left running as it is")

    # --- 1. leases -------------------------------------------------------------

    def release_leases(self) -> None:
        for lease in self.world.expired_leases:
            stamp = iso_utc(lease.expires_at) if lease.expires_at is not None else "?"
            holder = f" (holder {lease.holder})" if lease.holder else ""
            self.state.add("release", lease.id, lease.service, f"lease {lease.id}{holder} expired at {stamp}",
                     **self.on_gpus(lease.gpu_set), lease=lease.id)
        keep = []
        for lease in self.world.active_leases:
            if lease.kind == "service" and lease.service not in self.profile.services:
                self.state.add("release", lease.id, lease.service,
                         f"lease {lease.id}: service {lease.service!r} is no longer in the profile",
                         **self.on_gpus(lease.gpu_set), lease=lease.id)
            elif lease.kind == "service" and lease.service in self.on_hold:
                self.state.add("release", lease.id, lease.service,
                               f"lease {lease.id}: {lease.service} is {self.on_hold[lease.service]}",
                               **self.on_gpus(lease.gpu_set), lease=lease.id)
            else:
                keep.append(lease)
        self.world.active_leases = keep

    # --- 2. adoption -----------------------------------------------------------

    def adopt(self) -> None:
        for name, spec in sorted(self.profile.services.items()):
            if (name in self.world.instances or spec.managed is None or not spec.adoptable
                    or not self.world.probe_healthy(name)):
                continue
            port = spec.probe_port
            listener = self.world.listener(port)
            gpus = self._adopted_gpus(spec, listener.pid if listener else None)
            instance = Instance(
                service=name, **self.on_gpus(gpus), origin="adopted", pid=listener.pid if listener else None,
                create_time=listener.create_time if listener else None, state="running", since=self.world.now,
            )
            self.world.instances[name] = instance
            holder = f" (pid {listener.pid})" if listener else ""
            self.state.ready[name] = self.state.add(
                "adopt", name, name,
                f"healthy listener on port {port}{holder} answers {spec.managed.health_path}; "
                f"adopting it instead of starting a second one",
                **self.on_gpus(gpus),
            )

    def _adopted_gpus(self, spec: Service, pid: int | None) -> tuple[int, ...]:
        """Every GPU where NVML shows its process tree; else (nothing attributed) the first allowed ones."""
        if pid is not None:
            seen = tuple(sorted(gpu.index for gpu in self.snapshot.gpus
                                if any(self.world.owner_pid(p.pid, {pid}) == pid for p in gpu.processes)))
            if seen:
                return seen
        if spec.max_mb == 0:
            return ()
        allowed = self.allowed_gpus(spec)
        return tuple(allowed[:spec.gpu_count]) if len(allowed) >= spec.gpu_count else tuple(allowed[:1])

    # --- 3. stops and 4. restarts ----------------------------------------------

    def stop_unwanted(self, unwanted: dict[str, str]) -> None:
        for name, instance in sorted(self.world.instances.items()):
            spec = self.profile.services.get(name)
            why = unwanted.get(name)
            if why is None and spec is not None and spec.managed is None and instance.origin == "started":
                why = "no longer managed (the profile has no `managed:` block for it)"
            if why is None:
                continue
            if instance.origin == "adopted":
                if spec is None:
                    self.state.add("release", name, name, f"adopted instance: {why}; it keeps running",
                                   **self.on_gpus(instance.gpu_set))
                    self.state.gone.add(name)
                continue
            lost = self.lost(instance.gpu_set)
            if lost is not None:
                why += f"; {self.unseen_note(lost)}, so the memory it frees is not counted"
                self.state.add("stop", name, name, why, **self.on_gpus(instance.gpu_set))
            else:
                self.state.add("stop", name, name, why, **self.on_gpus(instance.gpu_set), mb=self.freed(name))
            self._free_up(name)

    def _free_up(self, service: str) -> None:
        for gpu in self.state.gpus(service):
            if gpu in self.state.free:
                self.state.free[gpu] += self.reservation(service, gpu)
        self.state.gone.add(service)
        self.state.touched.add(service)

    def restart_if_changed(self, name: str) -> None:
        """Restart our instance when its launch spec changed or an operator asked; a busy one drains first.

        A busy instance (holding leases) keeps serving until its leases end — as a busy instance
        serving another model does — unless the operator said ``now`` or the service has
        ``restart_when_busy``; meanwhile new demands wait for the restarted instance.
        """
        instance = self.world.instances.get(name)
        if instance is None or name in self.state.gone or instance.origin != "started" or instance.launch is None:
            return
        spec = self.profile.services[name]
        desired = launch_changed(name, spec, instance)
        if (desired is None and instance.restart is None) or name in self.state.draining:
            return
        reason = describe_launch_change(instance.launch, desired, self.redactor) if desired is not None else (
            "a restart was asked for" + (" (now)" if instance.restart == "now" else ""))
        held = self.held(name)
        if held and instance.restart != "now" and not spec.restart_when_busy:
            leases = "its lease ends" if held == 1 else f"its {held} leases end"
            self.state.wait(name, f"restart ({reason}) waits until {leases}; `reconciler restart {name} --now` "
                                  "restarts it now")
            self.state.draining[name] = f"it restarts once {leases}"
            return
        self.restart(name, instance, instance.model, reason)

    @staticmethod
    def span_change(spec: Service, instance: Instance) -> str | None:
        """Why an instance of ours runs on the wrong number of GPUs (``gpu_count`` was edited), or None."""
        span = instance.gpu_set
        if instance.origin != "started" or not span or spec.max_mb == 0 or len(span) == spec.gpu_count:
            return None
        return (f"gpu_count is {spec.gpu_count}: it runs on {len(span)} GPU{'s' if len(span) != 1 else ''} "
                f"(GPU {_ids(span)})")

    def restart(self, name: str, instance: Instance, model: str | None, reason: str) -> str | None:
        """Stop and start again on the same GPUs; evicts first when the new ceiling does not fit there."""
        spec = self.profile.services[name]
        span = instance.gpu_set
        gpu = span[0] if span else None
        if model is None and model_bound(spec):  # {model} would be filled with nothing
            self.state.wait(name, f"restart ({reason}) needs a model: set `model:` in the profile or name one in "
                                  "a lease", final=True)
            self.state.touched.add(name)
            return None
        desired = launch_spec(name, spec, span, model)
        problem = launch_problem(desired) if desired is not None else None
        if problem is not None:  # nothing is stopped for a start that cannot happen
            self.state.wait(name, f"restart ({reason}) cannot launch with model {model!r}: {problem}", final=True)
            self.state.touched.add(name)
            return None
        lost = self.lost(span)
        if lost is not None:
            self.state.wait(name, f"restart ({reason}) waits: {self.unseen_note(lost)}, and nothing is started there")
            self.state.touched.add(name)
            return None
        requires = [self.state.ready[d] for d in spec.depends_on if self.state.ready.get(d)]
        need = spec.ceiling_mb(model)  # the model's own ceiling, when models: gives it one
        priority = self.priority_of(name)
        if len(span) == 1 and gpu is not None:
            room_on = self.state.free[gpu] + self.reservation(name)
            if room_on < need:
                options = self._eviction_options(name, gpu, priority)
                choice = choose_eviction(options.candidates, options.closures, need - room_on)
                if choice is None:
                    self.state.wait(name, f"restart ({reason}) {refusal(need, gpu, max(0, room_on), options)}")
                    return None
                requires += self.evict(Placement((gpu,), choice), name, priority)
        elif span:  # every GPU of the set must take the new ceiling: one eviction across them
            room = {g: self.state.free[g] + self.reservation(name, g) for g in span}
            if any(room[g] < need for g in span):
                placed = place_set(need, len(span), list(span), room, self._eviction_pool(name, priority),
                                   prefer=span)
                if isinstance(placed, NoPlacement):
                    self.state.wait(name, f"restart ({reason}) {placed.reason}")
                    return None
                requires += self.evict(placed, name, priority)
        for g in span:
            self.state.free[g] += self.reservation(name, g) - need
        restart_id = self.state.add("restart", name, name, reason, **self.on_gpus(span),
                                    mb=need if span else None, model=model,
                                    requires=sorted(set(requires)))
        self.state.ready[name] = restart_id
        self.state.models[name] = model
        self.state.touched.add(name)
        return restart_id

    def stop_respanned(self, wanted: dict[str, str]) -> None:
        """Our instances whose ``gpu_count`` was edited (they run on another number of GPUs): stopped
        here, with the stops, and started again on a new set in priority order like any start — so
        what they give back counts for everything planned after. An instance is stopped only when
        some set could take it (its own memory counted as free); else it keeps running, pending. A
        busy one waits for its leases to end, as a restart does.
        """
        for name, instance in sorted(self.world.instances.items()):
            spec = self.profile.services.get(name)
            note = self.span_change(spec, instance) if spec is not None and spec.managed is not None else None
            if spec is None or note is None or name not in wanted or name in self.state.gone:
                continue
            if self.lost(instance.gpu_set) is not None:
                continue  # report_unseen says why it is left as it is
            held = self.held(name)
            if held and instance.restart != "now" and not spec.restart_when_busy:
                leases = "its lease ends" if held == 1 else f"its {held} leases end"
                self.state.wait(name, f"restart ({note}) waits until {leases}; `reconciler restart {name} --now` "
                                      "restarts it now")
                self.state.draining[name] = f"it restarts once {leases}"
                continue
            if spec.gpu_count > len(self.world.gpus):
                self.state.wait(name, f"restart ({note}) {self.too_few_gpus(spec)}; it keeps running as it is")
                continue
            room = dict(self.state.free)
            for g in instance.gpu_set:
                room[g] += self.reservation(name, g)
            placement = self.place(name, spec, None, self.priority_of(name), (), free=room,
                                   need=spec.ceiling_mb(instance.model))
            if isinstance(placement, NoPlacement):
                self.state.wait(name, f"restart ({note}) {placement.reason}; it keeps running as it is")
                continue
            self.state.add("stop", name, name, f"{note}; it starts again on {spec.gpu_count} GPU"
                           f"{'s' if spec.gpu_count != 1 else ''}", **self.on_gpus(instance.gpu_set),
                           mb=self.freed(name))
            self._free_up(name)
            self.state.respanned[name] = note

    def too_few_gpus(self, spec: Service) -> str:
        count = len(self.world.gpus)
        return (f"needs {spec.max_mb} MB on {spec.gpu_count} GPUs (gpu_count {spec.gpu_count}); this node has "
                f"{count} GPU{'s' if count != 1 else ''}")

    def relieve_over_commits(self) -> None:
        """A GPU booked beyond its total (a crash mid-eviction, an edit that raised a ceiling, foreign
        growth) is a condition: evict the least important until it fits, or say why nothing can be.

        Runs after the stops (what they give back counts) and before anything is started or
        granted, so nothing is granted on an instance about to go. Every running instance but the
        ``always_on`` is a candidate, compared by the usual eviction order (least important most
        important member first; fewest busy…).
        """
        for gpu in sorted(self.world.gpus):
            view = self.world.gpus[gpu]
            deficit = -self.state.free[gpu]
            if deficit <= 0:
                continue
            booked = view.reserved + view.foreign
            cause = f"GPU {gpu} is over-committed ({booked} MB booked on {view.total} MB)"
            options = self._eviction_options("", gpu, OVER_COMMIT_PRIORITY)
            choice = choose_eviction(options.candidates, options.closures, deficit)
            if choice is None:
                why = refusal(deficit, gpu, 0, options).split("; ", 1)[1:] or ["nothing here can be evicted"]
                self.state.wait(f"GPU {gpu}", f"over-committed: {booked} MB booked on {view.total} MB, "
                                              f"{deficit} MB must be freed; {why[0]}")
                continue
            self.evict(Placement((gpu,), choice), "", OVER_COMMIT_PRIORITY, cause=cause)

    # --- 5. starts and leases --------------------------------------------------

    def service_order(self, wanted: dict[str, str]) -> tuple[list[str], dict[str, int]]:
        effective = {name: self.profile.services[name].priority for name in wanted}
        for name in wanted:
            for dep in self.deps.needs(name):
                if dep in effective:
                    effective[dep] = min(effective[dep], self.profile.services[name].priority)
        topo = self.deps.order()
        return sorted(wanted, key=lambda n: (effective[n], topo[n], n)), effective

    def converge_services(self, wanted: dict[str, str]) -> None:
        order, effective = self.service_order(wanted)
        self.effective = effective
        demands: dict[str, list[Demand]] = {}
        for demand in sorted(self.snapshot.demands, key=lambda d: (d.requested_at is None, d.requested_at, d.id)):
            demands.setdefault(demand.service, []).append(demand)
        demanded = set(demands)
        for name in order:
            spec = self.profile.services[name]
            queue = demands.pop(name, [])
            self.restart_if_changed(name)
            moved = self._moved(name, queue, wanted, demanded) if name in self.world.instances else None
            if spec.managed is not None and (name not in self.world.instances or moved is not None
                                             or name in self.state.respanned):
                self.start(name, spec, moved or self.state.respanned.get(name) or wanted[name], queue, effective[name])
            if spec.managed is None:
                self.granting.grant_slot(name, spec, queue, effective[name])
            else:
                self.granting.grant_all(name, spec, queue)
        for name, queue in demands.items():
            for demand in queue:
                if name in self.on_hold:  # the operator's word: waiting would not help
                    self.state.wait(name, f"{name} is {self.on_hold[name]}", demand.id, final=True)
                else:
                    self.state.wait(name, f"demand {demand.id}: service {name!r} is not in the profile", demand.id)

    def _moved(self, name: str, queue: list[Demand], wanted: dict[str, str], demanded: set[str]) -> str | None:
        """An instance of ours evicted earlier in this pass that is still wanted: start it elsewhere.

        Still wanted: it has demands, or a wanted service that stays (or is itself started
        elsewhere for its demands) needs it — a dependency evicted to relieve an over-committed
        GPU, say. Otherwise the next pass would start it, and a plan must converge in one step.
        """
        instance = self.world.instances[name]
        if not self.state.evicts(name) or instance.origin != "started":
            return None
        if queue:
            return wanted[name]
        needing = sorted(other for other in wanted if other != name and name in self.deps.needs(other)
                         and (other not in self.state.gone or other in demanded))
        return f"needed by {', '.join(needing)}" if needing else None

    def start(self, name: str, spec: Service, why: str, queue: list[Demand], priority: int) -> None:
        blocked = [d for d in spec.depends_on if d in self.state.failed]
        if blocked:
            cause = self.state.failed[blocked[0]]
            return self._unreachable(name, queue, f"waits for {blocked[0]}, which cannot start: {cause}")
        dead = self.world.dead.get(name)
        respanned = self.world.instances[name] if name in self.state.respanned else None  # it keeps its model
        model = ((queue[0].model if queue and queue[0].model else None) or (dead.model if dead else None)
                 or (respanned.model if respanned else None) or spec.model)
        if model is None and model_bound(spec):
            return self._unreachable(name, queue, "needs a model: set `model:` in the profile or name one in the lease")
        launch = launch_spec(name, spec, dead.gpu_set if dead else None, model)
        problem = launch_problem(launch) if launch is not None else None
        if problem is not None:
            return self._unreachable(name, queue, f"cannot be launched with model {model!r}: {problem}", final=True)
        conflict = self._port_conflict(name, spec)
        if conflict:
            return self._unreachable(name, queue, conflict)
        gpus: tuple[int, ...] = ()
        requires = [self.state.ready[d] for d in spec.depends_on if self.state.ready.get(d)]
        for gone in (self.state.action("evict", name), self.state.action("stop", name)):
            if gone is not None:
                requires.append(gone.id)  # the instance evicted or stopped still holds the port until it is gone
        need = spec.ceiling_mb(model)  # the model's own ceiling, when models: gives it one
        if need > 0:
            if not self.world.gpus:
                return self._unreachable(name, queue, f"needs {need} MB of GPU memory; this node has no GPU")
            if spec.gpu_count > len(self.world.gpus):
                return self._unreachable(name, queue, self.too_few_gpus(spec))
            placement = self.place(name, spec, queue[0] if queue else None, priority, dead.gpu_set if dead else (),
                                   need=need)
            if isinstance(placement, NoPlacement):
                return self._unreachable(name, queue, placement.reason + self._held_note(spec, queue))
            gpus = placement.gpus
            requires += self.evict(placement, name, priority)
            for gpu in gpus:
                stops = [a for a in self.state.actions.values() if a.kind == "stop" and gpu in a.gpu_set]
                if self.state.free[gpu] - sum(self._gives(a, gpu) for a in stops) < need:
                    requires += [a.id for a in stops]  # it needs the memory those stops give back
            for gpu in gpus:
                self.state.free[gpu] -= need
        detail = ""
        if dead is not None and dead.pid is not None:
            process = self.world.processes.get(dead.pid)
            if process is None:
                detail = f"; was pid {dead.pid}, which is gone"
            elif dead.create_time is not None and not same_start(dead.create_time, process.create_time):
                detail = f"; was pid {dead.pid}, which now belongs to another process"
            else:
                detail = f"; its last instance (pid {dead.pid}) failed"
        if len(gpus) == 1:
            where = f" on GPU {gpus[0]} ({need} MB, {self.state.free[gpus[0]]} MB left free)"
        elif gpus:
            left = _and([str(self.state.free[g]) for g in gpus])
            where = f" on GPUs {_and(gpus)} ({need} MB on each; {left} MB left free)"
        else:
            where = ""
        self.state.ready[name] = self.state.add("start", name, name, f"wanted ({why}){detail}; starting{where}",
                                    **self.on_gpus(gpus), mb=need if gpus else None, model=model,
                                    requires=sorted(set(requires)))
        self.state.models[name], self.state.placed[name] = model, gpus
        self.state.touched.add(name)

    def _held_note(self, spec: Service, queue: list[Demand]) -> str:
        """``; 1024 MB held for start:tts`` — what this plan's starts and restarts already took on the GPUs it
        could use, so a reason's "free" figure says where the memory went (as the status and a VRAM lease do)."""
        allowed = set(self.allowed_gpus(spec, queue[0] if queue else None))
        notes = [f"{a.mb} MB held for {a.id}" for a in self.state.actions.values()
                 if a.kind in ("start", "restart") and a.mb and allowed & set(a.gpu_set)]
        return f"; {', '.join(notes)}" if notes else ""

    def _gives(self, action: Action, gpu: int) -> int:
        """What a stop or an evict emitted so far gives back on ``gpu``."""
        if action.mb is None:
            return 0
        return action.mb if len(action.gpu_set) == 1 else self.reservation(action.service, gpu)

    def _unreachable(self, name: str, queue: list[Demand], reason: str, *, final: bool = False) -> None:
        self.state.failed[name] = reason
        if queue:
            for demand in queue:
                self.state.wait(name, reason, demand.id, final=final)
            queue.clear()
        else:
            self.state.wait(name, reason, final=final)

    def _port_conflict(self, name: str, spec: Service) -> str | None:
        port = spec.probe_port
        if port is None:
            return None
        ours = {i.pid for i in self.world.instances.values() if i.pid is not None}
        holder = self.world.listener(port)
        if holder is not None and self.world.owner_pid(holder.pid, ours) is None:
            command = " ".join(holder.cmdline[:3]) or "unknown command"
            return f"port {port} is held by pid {holder.pid} ({command}), which is not {name}'s instance"
        if holder is None and self.world.probe_healthy(name):
            return f"port {port} already answers health checks, but not from an instance of {name}"
        return None

    def place(
        self, name: str, spec: Service, demand: Demand | None, priority: int, prefer: tuple[int, ...],
        free: dict[int, int] | None = None, *, need: int | None = None,
    ) -> Placement | NoPlacement:
        """Where ``need`` MB (default: the service's ``max_mb``) of ``name`` go: one GPU, or that much on each of a set
        of ``gpu_count`` (``prefer``: where it ran last), evicting what it may."""
        mb = spec.max_mb if need is None else need
        free = self.state.free if free is None else free
        if spec.gpu_count == 1:
            return place(mb, self.allowed_gpus(spec, demand), free,
                         lambda gpu: self._eviction_options(name, gpu, priority), prefer[0] if prefer else None)
        return place_set(mb, spec.gpu_count, self.allowed_gpus(spec), free,
                         self._eviction_pool(name, priority), prefer, demand.gpu if demand is not None else None)

    def _eviction_options(self, requester: str, gpu: int, priority: int) -> EvictionOptions:
        return self._eviction_pool(requester, priority).on(gpu)

    def _eviction_pool(self, requester: str, priority: int) -> EvictionPool:
        protected = self.deps.needs(requester)
        live = {n: i for n, i in self.world.instances.items() if n not in self.state.gone}
        # leased unmanaged slots hold memory no driver can free: they are never evicted, and
        # neither is anything they depend on
        held_slots = {n for n, spec in self.profile.services.items()
                      if spec.managed is None and self.held(n)}

        def evictable(name: str) -> bool:
            spec = self.profile.services.get(name)
            return (name in live and spec is not None and self.priority_of(name) > priority and not spec.always_on
                    and name not in self.state.touched and name not in protected
                    and self.lost(live[name].gpu_set) is None and self._can_free(name, live[name]))

        holders = set(live) | held_slots
        closures = {n: self.deps.needed_by(n) & holders for n in live}
        candidates: dict[str, Spread] = {}
        blockers: dict[int, list[str]] = {}
        for name in sorted(live):
            spec = self.profile.services.get(name)
            blocked = [m for m in sorted(closures[name]) if not evictable(m)]
            if not blocked:
                assert spec is not None, "evictable() holds only for services in the profile"
                busy = self.held(name) > 0
                mb = {g: self.reservation(name, g) for g in live[name].gpu_set}
                candidates[name] = Spread(name, self.priority_of(name), busy, mb)
            elif live[name].gpu_set and spec is not None:
                if self.priority_of(name) <= priority:
                    why = f"priority {self.priority_of(name)}"
                    if self.priority_of(name) != spec.priority:
                        why += " as a dependency of a service of that priority"
                elif spec.always_on:
                    why = "always_on"
                elif blocked[0] != name:
                    why = f"{blocked[0]} depends on it"
                elif name in self.state.touched or name in protected:
                    why = "needed by this plan"
                else:
                    why = "adopted; its memory cannot be freed without killing it"
                for g in live[name].gpu_set:
                    blockers.setdefault(g, []).append(f"{name} ({why})")
        return EvictionPool(candidates, {n: closures[n] for n in candidates}, blockers)

    def _can_free(self, name: str, instance: Instance) -> bool:
        """Adopted instances are evictable only where a driver frees memory without killing (Ollama)."""
        if instance.origin == "started":
            return True
        return is_ollama(self.profile.services[name])

    def evict(self, placement: Placement, requester: str, priority: int, *, cause: str | None = None) -> list[str]:
        """Evict ``placement.eviction`` for ``requester`` (or for ``cause``, said in its words); returns the ids."""
        ids = []
        beneficiary = f"{requester} (priority {priority})"
        for name in placement.eviction.services:
            spec = self.profile.services[name]
            instance = self.world.instances[name]
            how = " (its models are unloaded; the process keeps running)" if instance.origin == "adopted" else ""
            span = self.state.gpus(name)
            mb = self.freed(name)
            adopted = self.state.ready_after(name)
            adopting = [adopted.id] if adopted is not None and adopted.kind == "adopt" else []
            evicted_deps = [d for d in spec.depends_on if d in placement.eviction.services]
            if cause is not None:
                frees = f"{mb} MB" if len(span) <= 1 else self.frees_text(name)
                why = f"{cause}: frees {frees}" if not evicted_deps else (
                    f"{cause}: depends on {', '.join(evicted_deps)}, which is evicted")
            elif set(span) & set(placement.gpus) or not evicted_deps:
                why = f"frees {self.frees_text(name)} for {beneficiary}"
            else:
                why = f"depends on {', '.join(evicted_deps)}, which is evicted for {beneficiary}"
            evict_id = self.state.add(
                "evict", name, name, f"{why}; {name} has priority {spec.priority}{how}",
                **self.on_gpus(span), mb=mb, requires=adopting,
            )
            self._free_up(name)
            if instance.origin == "adopted":
                self.state.ready[name] = evict_id
            ids.append(evict_id)
            for lease in self.world.leases_of(name):
                self.state.released.add(lease.id)
                self.state.add("release", lease.id, name, f"lease {lease.id}: {name} is evicted for {requester}",
                               **self.on_gpus(lease.gpu_set), lease=lease.id, requires=[evict_id])
        for evict_id in ids:  # dependents go first
            name = self.state.actions[evict_id].service
            dependents = self.deps.needed_by(name) - {name}
            deps = [evicting for d in dependents if (evicting := action_id("evict", d)) in ids]
            self.state.update(evict_id, requires=sorted(set(self.state.actions[evict_id].requires) | set(deps)))
        return ids

    # --- the whole pass --------------------------------------------------------

    def run(self) -> Plan:
        before = World(self.profile, self.snapshot)
        before.account()
        self.on_hold = held_closure(self.world, self.deps) if self.snapshot.held else {}
        self.release_leases()
        self.adopt()
        self.world.account()
        self.state.free = {g: view.headroom for g, view in self.world.gpus.items()}
        self.headroom = dict(self.state.free)  # what is free before the plan: what consumers may count on
        self.state.placed = {name: i.gpu_set for name, i in self.world.instances.items()}
        slots: dict[str, tuple[int, ...]] = {}
        for holder_gpu, view in self.world.gpus.items():
            for key, holder in view.holders.items():
                if holder.origin == "slot":
                    slots[key] = (*slots.get(key, ()), holder_gpu)
        self.state.placed.update(slots)
        wanted = compute_wanted(self.world, self.deps)
        self.stop_unwanted(wanted.unwanted)
        for name in self.world.instances:
            if name not in self.state.gone:
                self.state.ready.setdefault(name, None)
        self.relieve_over_commits()
        self.stop_respanned(wanted.wanted)
        self.converge_services(wanted.wanted)
        self.report_unseen()
        self._order_stops()
        self._order_memory()
        return self._finish(before)

    def _order_stops(self) -> None:
        for action in list(self.state.actions.values()):
            if action.kind != "stop" or action.service not in self.profile.services:
                continue
            dependents = self.deps.needed_by(action.service) - {action.service}
            extra = [stop.id for d in sorted(dependents) if (stop := self.state.action("stop", d)) is not None]
            if extra:
                self.state.update(action.id, requires=sorted(set(action.requires) | set(extra)))

    def booked(self) -> dict[tuple[str, int], int]:
        """(holder, GPU) → what it books before the plan (after adoption): what a restart gives back first."""
        return {(name, view.index): holder.reservation
                for view in self.world.gpus.values() for name, holder in view.holders.items()}

    def over_commits(self, result: Plan) -> dict[int, str]:
        """GPUs where some order the executor may choose books more than was free before the plan (none, ever)."""
        out = {}
        for gpu, extra in peak_extra(result, self.booked()).items():
            if extra > max(0, self.headroom.get(gpu, 0)):
                out[gpu] = f"some order books {extra} MB beyond today's; {self.headroom.get(gpu, 0)} MB were free"
        return out

    def _order_memory(self) -> None:
        """Every action that takes memory requires every action that frees the memory it counts on.

        Walking each GPU's actions in the order the plan emitted them (the
        order its running ``free`` figure was kept in), a consumer that does
        not fit in what was free before the plan, less what every earlier
        consumer there takes, counts on memory given back by the freers emitted
        before it — so it requires all of them. The later leases of an
        unmanaged slot take nothing more, but whichever is granted first books
        the slot: each requires what the first one does. On a GPU that is
        over-committed before the plan, every start, restart and slot lease
        waits for the freers emitted before it (its bookings say more than its
        processes use, or the other way round: only what was freed is sure). So
        no order the executor may choose books more than a GPU has, at any
        moment (invariant 4; :mod:`.interleavings` checks it).
        """
        moves = memory_moves(list(self.state.actions.values()), self.booked())
        first_of_slot: dict[tuple[str, int], int] = {}  # (first lease, GPU) → what it books there
        for key, members in moves.slots.items():
            first_of_slot[(members[0], key[1])] = moves.slot_mb[key]
        later_of_slot = {m: members[0] for members in moves.slots.values() for m in members[1:]}
        taken: dict[int, int] = {}
        freers: dict[int, list[str]] = {}
        for current in list(self.state.actions):
            action = self.state.actions[current]
            if not action.gpu_set:
                continue
            if current in later_of_slot:
                first = self.state.actions[later_of_slot[current]]
                self.state.update(current, requires=sorted(set(action.requires) | set(first.requires)))
                continue
            needed: set[str] = set()
            for gpu in action.gpu_set:  # each GPU it takes memory on, on its own
                take = first_of_slot.get((current, gpu), moves.taken.get((current, gpu), 0))
                over = self.headroom.get(gpu, 0) < 0 and action.kind in ("start", "restart", "lease")
                if take > 0 or over:  # on an over-committed GPU, even a restart to the same ceiling waits
                    if over or self.headroom.get(gpu, 0) - taken.get(gpu, 0) < take:
                        needed |= set(freers.get(gpu, [])) - {current}
                    taken[gpu] = taken.get(gpu, 0) + take
            if not needed <= set(action.requires):
                self.state.update(current, requires=sorted(set(action.requires) | needed))
            for gpu in moves.gives_on(current):
                freers.setdefault(gpu, []).append(current)

    def _finish(self, before: World) -> Plan:
        from reconciler.core.simulate import simulate  # simulate imports the planner's helpers

        rank = {kind: i for i, kind in enumerate(ACTION_KINDS)}
        order = list(self.state.actions)
        edges = [(req, action.id) for action in self.state.actions.values() for req in action.requires
                 if req in self.state.actions]
        index = {a: i for i, a in enumerate(order)}
        sorted_ids = topological_order(order, edges, key=lambda a: (rank[self.state.actions[a].kind], index[a]))
        actions = [self.state.actions[a] for a in sorted_ids]
        summary: dict[str, int] = {kind: sum(1 for a in actions if a.kind == kind) for kind in ACTION_KINDS}
        draft = redact_plan(Plan(node=self.snapshot.node, profile=self.profile.name, changes=bool(actions),
                                 actions=actions, pending=self.state.pending, gpus=[], summary=summary), self.redactor)
        after = World(self.profile, simulate(self.profile, self.snapshot, draft))
        after.account()
        gpus = [GpuSummary(index=g, total_mb=view.total, free_mb=view.free,
                           free_mb_after=after.gpus[g].free if g in after.gpus else view.free)
                for g, view in before.gpus.items()]
        return draft.model_copy(update={"gpus": gpus})


def _ids(gpus: tuple[int, ...]) -> str:
    """``0`` or ``0,1``: GPU indexes as a reason names them after the word GPU."""
    return ",".join(map(str, gpus))


def _and(items: tuple[int, ...] | list[str]) -> str:
    """``0 and 1``; ``0, 1 and 2``."""
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
