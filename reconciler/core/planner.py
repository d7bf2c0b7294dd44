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

Anything wanted that cannot be reached goes to ``pending`` with a reason that
names the numbers. Everything the plan so far does lives in one
:class:`~.plan_state.PlanState`; granting demands is :mod:`.granting` (which
asks the planner to restart, place and evict through its methods), the
eviction choice :mod:`.eviction`, placement :mod:`.placement`, and "can this
instance serve that request" :mod:`.compatibility`. The planner imports
nothing that touches the host.
"""

from __future__ import annotations

from reconciler.core.clock import iso_utc
from reconciler.core.compatibility import model_bound
from reconciler.core.dependencies import Dependencies, topological_order
from reconciler.core.eviction import Candidate, choose_eviction
from reconciler.core.granting import DemandGranting, describe_launch_change
from reconciler.core.identity import same_start
from reconciler.core.interleavings import memory_moves, peak_extra
from reconciler.core.launch import launch_changed, launch_problem, launch_spec
from reconciler.core.placement import EvictionOptions, NoPlacement, Placement, place, refusal
from reconciler.core.plan import ACTION_KINDS, GpuSummary, Plan, action_id
from reconciler.core.plan_state import PlanState
from reconciler.core.profile import Profile, Service, is_ollama
from reconciler.core.redaction import Redactor, redact_plan
from reconciler.core.snapshot import Demand, Instance, Snapshot
from reconciler.core.wanted import compute_wanted
from reconciler.core.world import World

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

    # --- building blocks -----------------------------------------------------

    def held(self, service: str) -> int:
        """Leases the service holds once this plan is applied so far (kept + granted − released)."""
        kept = [lease for lease in self.world.leases_of(service) if lease.id not in self.state.released]
        return len(kept) + self.state.granted.get(service, 0)

    def reservation(self, service: str) -> int:
        gpu = self.state.gpu_of.get(service)
        view = self.world.gpus.get(gpu) if gpu is not None else None
        holder = view.holders.get(service) if view else None
        return holder.reservation if holder else 0

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

    @staticmethod
    def unseen_note(gpu: int | None) -> str:
        return f"GPU {gpu} cannot be seen on this host (NVML failing, or a --gpu spec that leaves it out)"

    def report_unseen(self) -> None:
        """A condition per instance on a GPU the host does not show: left as it is, and said so."""
        for name, instance in sorted(self.world.instances.items()):
            if (self.unseen(instance.gpu) and name not in self.state.gone and name in self.profile.services
                    and not any(p.service == name and p.demand is None for p in self.state.pending)):
                self.state.wait(name, f"{name} runs on GPU {instance.gpu}; {self.unseen_note(instance.gpu)}: "
                                      f"nothing is started on or evicted from it, and {name} is left running as it is")

    # --- 1. leases -------------------------------------------------------------

    def release_leases(self) -> None:
        for lease in self.world.expired_leases:
            stamp = iso_utc(lease.expires_at) if lease.expires_at is not None else "?"
            holder = f" (holder {lease.holder})" if lease.holder else ""
            self.state.add("release", lease.id, lease.service, f"lease {lease.id}{holder} expired at {stamp}",
                     gpu=lease.gpu, lease=lease.id)
        keep = []
        for lease in self.world.active_leases:
            if lease.kind == "service" and lease.service not in self.profile.services:
                self.state.add("release", lease.id, lease.service,
                         f"lease {lease.id}: service {lease.service!r} is no longer in the profile",
                         gpu=lease.gpu, lease=lease.id)
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
            gpu = self._adopted_gpu(spec, listener.pid if listener else None)
            instance = Instance(
                service=name, gpu=gpu, origin="adopted", pid=listener.pid if listener else None,
                create_time=listener.create_time if listener else None, state="running", since=self.world.now,
            )
            self.world.instances[name] = instance
            holder = f" (pid {listener.pid})" if listener else ""
            self.state.ready[name] = self.state.add(
                "adopt", name, name,
                f"healthy listener on port {port}{holder} answers {spec.managed.health_path}; "
                f"adopting it instead of starting a second one",
                gpu=gpu,
            )

    def _adopted_gpu(self, spec: Service, pid: int | None) -> int | None:
        if pid is not None:
            for gpu in self.snapshot.gpus:
                if any(self.world.owner_pid(p.pid, {pid}) == pid for p in gpu.processes):
                    return gpu.index
        if spec.max_mb == 0:
            return None
        allowed = self.allowed_gpus(spec)
        return allowed[0] if allowed else None

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
                                   gpu=instance.gpu)
                    self.state.gone.add(name)
                continue
            if self.unseen(instance.gpu):
                why += f"; {self.unseen_note(instance.gpu)}, so the memory it frees is not counted"
                self.state.add("stop", name, name, why, gpu=instance.gpu)
            else:
                self.state.add("stop", name, name, why, gpu=instance.gpu, mb=self.reservation(name))
            self._free_up(name)

    def _free_up(self, service: str) -> None:
        gpu = self.state.gpu_of.get(service)
        if gpu is not None and gpu in self.state.free:
            self.state.free[gpu] += self.reservation(service)
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
        if desired is None and instance.restart is None:
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

    def restart(self, name: str, instance: Instance, model: str | None, reason: str) -> str | None:
        """Stop and start again on the same GPU; evicts first when the new ceiling does not fit."""
        spec = self.profile.services[name]
        gpu = instance.gpu
        if model is None and model_bound(spec):  # {model} would be filled with nothing
            self.state.wait(name, f"restart ({reason}) needs a model: set `model:` in the profile or name one in "
                                  "a lease", final=True)
            self.state.touched.add(name)
            return None
        desired = launch_spec(name, spec, gpu, model)
        problem = launch_problem(desired) if desired is not None else None
        if problem is not None:  # nothing is stopped for a start that cannot happen
            self.state.wait(name, f"restart ({reason}) cannot launch with model {model!r}: {problem}", final=True)
            self.state.touched.add(name)
            return None
        if self.unseen(gpu):
            self.state.wait(name, f"restart ({reason}) waits: {self.unseen_note(gpu)}, and nothing is started there")
            self.state.touched.add(name)
            return None
        requires = [self.state.ready[d] for d in spec.depends_on if self.state.ready.get(d)]
        need = spec.ceiling_mb(model)  # the model's own ceiling, when models: gives it one
        if gpu is not None:
            room = self.state.free[gpu] + self.reservation(name)
            if room < need:
                options = self._eviction_options(name, gpu, self.priority_of(name))
                choice = choose_eviction(options.candidates, options.closures, need - room)
                if choice is None:
                    self.state.wait(name, f"restart ({reason}) {refusal(need, gpu, max(0, room), options)}")
                    return None
                requires += self.evict(Placement(gpu, choice), name, self.priority_of(name))
            self.state.free[gpu] += self.reservation(name) - need
        restart_id = self.state.add("restart", name, name, reason, gpu=gpu,
                                    mb=need if gpu is not None else None, model=model,
                                    requires=sorted(set(requires)))
        self.state.ready[name] = restart_id
        self.state.models[name] = model
        self.state.touched.add(name)
        return restart_id

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
            self.evict(Placement(gpu, choice), "", OVER_COMMIT_PRIORITY, cause=cause)

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
        for name in order:
            spec = self.profile.services[name]
            queue = demands.pop(name, [])
            self.restart_if_changed(name)
            if spec.managed is not None and (name not in self.world.instances or self._moved(name, queue)):
                self.start(name, spec, wanted[name], queue, effective[name])
            if spec.managed is None:
                self.granting.grant_slot(name, spec, queue, effective[name])
            else:
                self.granting.grant_all(name, spec, queue)
        for name, queue in demands.items():
            for demand in queue:
                self.state.wait(name, f"demand {demand.id}: service {name!r} is not in the profile", demand.id)

    def _moved(self, name: str, queue: list[Demand]) -> bool:
        """An instance of ours evicted earlier in this pass that still has demands: start it elsewhere."""
        instance = self.world.instances[name]
        return bool(queue) and self.state.evicts(name) and instance.origin == "started"

    def start(self, name: str, spec: Service, why: str, queue: list[Demand], priority: int) -> None:
        blocked = [d for d in spec.depends_on if d in self.state.failed]
        if blocked:
            cause = self.state.failed[blocked[0]]
            return self._unreachable(name, queue, f"waits for {blocked[0]}, which cannot start: {cause}")
        dead = self.world.dead.get(name)
        model = (queue[0].model if queue and queue[0].model else None) or (dead.model if dead else None) or spec.model
        if model is None and model_bound(spec):
            return self._unreachable(name, queue, "needs a model: set `model:` in the profile or name one in the lease")
        launch = launch_spec(name, spec, dead.gpu if dead else None, model)
        problem = launch_problem(launch) if launch is not None else None
        if problem is not None:
            return self._unreachable(name, queue, f"cannot be launched with model {model!r}: {problem}", final=True)
        conflict = self._port_conflict(name, spec)
        if conflict:
            return self._unreachable(name, queue, conflict)
        gpu, requires = None, [self.state.ready[d] for d in spec.depends_on if self.state.ready.get(d)]
        evicted = self.state.action("evict", name)
        if evicted is not None:
            requires.append(evicted.id)  # the evicted instance still holds the port until it is gone
        need = spec.ceiling_mb(model)  # the model's own ceiling, when models: gives it one
        if need > 0:
            if not self.world.gpus:
                return self._unreachable(name, queue, f"needs {need} MB of GPU memory; this node has no GPU")
            placement = self.place(name, spec, queue[0] if queue else None, priority, dead.gpu if dead else None,
                                   need=need)
            if isinstance(placement, NoPlacement):
                return self._unreachable(name, queue, placement.reason)
            gpu = placement.gpu
            requires += self.evict(placement, name, priority)
            stops = [a for a in self.state.actions.values() if a.kind == "stop" and a.gpu == gpu]
            if self.state.free[gpu] - sum(a.mb or 0 for a in stops) < need:
                requires += [a.id for a in stops]  # it needs the memory those stops give back
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
        where = f" on GPU {gpu} ({need} MB, {self.state.free[gpu]} MB left free)" if gpu is not None else ""
        self.state.ready[name] = self.state.add("start", name, name, f"wanted ({why}){detail}; starting{where}",
                                    gpu=gpu, mb=need if gpu is not None else None, model=model,
                                    requires=sorted(set(requires)))
        self.state.models[name], self.state.gpu_of[name] = model, gpu
        self.state.touched.add(name)

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
        self, name: str, spec: Service, demand: Demand | None, priority: int, prefer: int | None,
        *, need: int | None = None,
    ) -> Placement | NoPlacement:
        """Where ``need`` MB (default: the service's ``max_mb``) of ``name`` go, evicting what it may."""
        return place(spec.max_mb if need is None else need, self.allowed_gpus(spec, demand), self.state.free,
                     lambda gpu: self._eviction_options(name, gpu, priority), prefer)

    def _eviction_options(self, requester: str, gpu: int, priority: int) -> EvictionOptions:
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
                    and not self.unseen(live[name].gpu) and self._can_free(name, live[name]))

        holders = set(live) | held_slots
        closures = {n: self.deps.needed_by(n) & holders for n in live}
        candidates: dict[str, Candidate] = {}
        blockers: list[str] = []
        for name in sorted(live):
            spec = self.profile.services.get(name)
            blocked = [m for m in sorted(closures[name]) if not evictable(m)]
            if not blocked:
                assert spec is not None, "evictable() holds only for services in the profile"
                busy = self.held(name) > 0
                mb = self.reservation(name) if live[name].gpu == gpu else 0
                candidates[name] = Candidate(name, self.priority_of(name), busy, mb)
            elif live[name].gpu == gpu and spec is not None:
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
                blockers.append(f"{name} ({why})")
        return EvictionOptions(candidates, {n: closures[n] for n in candidates}, blockers)

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
            mb = self.reservation(name)
            adopted = self.state.ready_after(name)
            adopting = [adopted.id] if adopted is not None and adopted.kind == "adopt" else []
            evicted_deps = [d for d in spec.depends_on if d in placement.eviction.services]
            if cause is not None:
                why = f"{cause}: frees {mb} MB" if not evicted_deps else (
                    f"{cause}: depends on {', '.join(evicted_deps)}, which is evicted")
            elif instance.gpu == placement.gpu or not evicted_deps:
                where = f"GPU {instance.gpu}" if instance.gpu is not None else "no GPU"
                why = f"frees {mb} MB on {where} for {beneficiary}"
            else:
                why = f"depends on {', '.join(evicted_deps)}, which is evicted for {beneficiary}"
            evict_id = self.state.add(
                "evict", name, name, f"{why}; {name} has priority {spec.priority}{how}",
                gpu=instance.gpu, mb=mb, requires=adopting,
            )
            self._free_up(name)
            if instance.origin == "adopted":
                self.state.ready[name] = evict_id
            ids.append(evict_id)
            for lease in self.world.leases_of(name):
                self.state.released.add(lease.id)
                self.state.add("release", lease.id, name, f"lease {lease.id}: {name} is evicted for {requester}",
                               gpu=lease.gpu, lease=lease.id, requires=[evict_id])
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
        self.release_leases()
        self.adopt()
        self.world.account()
        self.state.free = {g: view.headroom for g, view in self.world.gpus.items()}
        self.headroom = dict(self.state.free)  # what is free before the plan: what consumers may count on
        self.state.gpu_of = {name: i.gpu for name, i in self.world.instances.items()}
        for holder_gpu, view in self.world.gpus.items():
            for key, holder in view.holders.items():
                if holder.origin == "slot":
                    self.state.gpu_of[key] = holder_gpu
        wanted = compute_wanted(self.world, self.deps)
        self.stop_unwanted(wanted.unwanted)
        for name in self.world.instances:
            if name not in self.state.gone:
                self.state.ready.setdefault(name, None)
        self.relieve_over_commits()
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
        first_of_slot = {members[0]: key for key, members in moves.slots.items()}
        later_of_slot = {m: members[0] for members in moves.slots.values() for m in members[1:]}
        taken: dict[int, int] = {}
        freers: dict[int, list[str]] = {}
        for current in list(self.state.actions):
            action = self.state.actions[current]
            if action.gpu is None:
                continue
            gpu = action.gpu
            if current in later_of_slot:
                first = self.state.actions[later_of_slot[current]]
                self.state.update(current, requires=sorted(set(action.requires) | set(first.requires)))
                continue
            take = moves.taken.get(current, 0)
            if current in first_of_slot:
                take = moves.slot_mb[first_of_slot[current]]
            over = self.headroom.get(gpu, 0) < 0 and action.kind in ("start", "restart", "lease")
            if take > 0 or over:  # on an over-committed GPU, even a restart to the same ceiling waits
                if over or self.headroom.get(gpu, 0) - taken.get(gpu, 0) < take:
                    needed = set(freers.get(gpu, [])) - {current}
                    if not needed <= set(action.requires):
                        self.state.update(current, requires=sorted(set(action.requires) | needed))
                taken[gpu] = taken.get(gpu, 0) + take
            if moves.given.get(current, 0) > 0:
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
