"""Apply a plan to a snapshot, on paper: the snapshot the host would show afterwards.

Used for ``free_mb_after`` and for the convergence property (planning the
simulated result of a plan yields no actions). The simulated host behaves
like the simulated GPU backend: a started instance is a new process (fresh
pid, ``create_time`` = now) listening on its port, answering its probe, and
using its ceiling (the model's ``max_mb``, else the service's) on its GPU (on each of its GPUs, for a
service that spans several); a stopped or evicted one is gone with its
memory; an evicted adopted Ollama keeps running with its models unloaded.
"""

from __future__ import annotations

from datetime import timedelta

from reconciler.core.launch import launch_spec
from reconciler.core.plan import Action, Plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import GpuProcess, Instance, Lease, Probe, Process, Snapshot


class _Host:
    def __init__(self, profile: Profile, snapshot: Snapshot):
        self.profile = profile
        self.snapshot = snapshot
        self.now = snapshot.now
        self.gpus = {g.index: g for g in snapshot.gpus}
        self.processes = {p.pid: p for p in snapshot.processes}
        self.probes = dict(snapshot.probes)
        self.instances = {i.service: i for i in snapshot.instances}
        self.leases = {lease.id: lease for lease in snapshot.leases}
        self.demands = {d.id: d for d in snapshot.demands}
        pids = [p.pid for p in snapshot.processes] + [i.pid for i in snapshot.instances if i.pid]
        self.next_pid = max([100_000, *pids]) + 1

    # --- processes and GPU memory ---------------------------------------------

    def _tree(self, pid: int) -> set[int]:
        tree, grew = {pid}, True
        while grew:
            more = {p.pid for p in self.processes.values() if p.ppid in tree} - tree
            tree |= more
            grew = bool(more)
        return tree

    def _set_usage(
        self, pids: set[int], gpus: tuple[int, ...], mb: int | None, owner: int | None = None
    ) -> None:
        """Drop ``pids`` from every GPU, then (if ``mb`` is given) charge ``mb`` to ``owner`` on each of ``gpus``."""
        for index, g in list(self.gpus.items()):
            kept = [p for p in g.processes if p.pid not in pids]
            removed = sum(p.used_mb for p in g.processes if p.pid in pids)
            add: list[GpuProcess] = []
            added = 0
            if mb is not None and index in gpus:
                assert owner is not None, "memory is charged to a process"
                add = [GpuProcess(pid=owner, used_mb=mb)]
                added = mb
            used = max(0, g.used_mb - removed) + added
            self.gpus[index] = g.model_copy(update={"processes": kept + add, "used_mb": used, "free_mb": None})

    def kill(self, instance: Instance) -> None:
        if instance.pid is None:  # a container we cannot see into: its memory was unattributed
            for index in instance.gpu_set:
                gpu = self.gpus.get(index)
                if gpu is not None:
                    unattributed = max(0, gpu.used_mb - sum(p.used_mb for p in gpu.processes))
                    spec = self.profile.services.get(instance.service)
                    freed = min(unattributed, spec.ceiling_mb(instance.model) if spec else 0)
                    self.gpus[gpu.index] = gpu.model_copy(update={"used_mb": gpu.used_mb - freed, "free_mb": None})
            return
        tree = self._tree(instance.pid)
        self._set_usage(tree, (), None)
        for pid in tree:
            self.processes.pop(pid, None)

    def spawn(self, action: Action) -> Instance:
        spec = self.profile.services[action.service]
        launch = launch_spec(action.service, spec, action.gpu_set, action.model)
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        port = spec.probe_port
        self.processes[pid] = Process(pid=pid, create_time=self.now.timestamp(), cmdline=launch.argv if launch else [],
                                      listening=[port] if port else [])
        need = spec.ceiling_mb(action.model)
        if action.gpu_set and need > 0:
            self._set_usage({pid}, action.gpu_set, need, pid)
        if port is not None:
            self.probes[action.service] = Probe(healthy=True, status=200)
        return Instance(service=action.service, gpu=action.gpu, gpus=action.gpus, origin="started", pid=pid,
                        create_time=self.now.timestamp(), model=action.model, launch=launch, state="running",
                        since=self.now)

    # --- actions -----------------------------------------------------------------

    def apply(self, action: Action) -> None:
        getattr(self, f"_{action.kind}")(action)

    def _adopt(self, action: Action) -> None:
        port = self.profile.services[action.service].probe_port
        listener = next((p for p in self.processes.values() if port in p.listening), None)
        self.instances[action.service] = Instance(
            service=action.service, gpu=action.gpu, gpus=action.gpus, origin="adopted",
            pid=listener.pid if listener else None,
            create_time=listener.create_time if listener else None, state="running", since=self.now)

    def _start(self, action: Action) -> None:
        self.instances[action.service] = self.spawn(action)

    def _restart(self, action: Action) -> None:
        old = self.instances[action.service]
        self.kill(old)
        self.instances[action.service] = self.spawn(action).model_copy(update={"idle_since": old.idle_since})

    def _stop(self, action: Action) -> None:
        instance = self.instances.pop(action.service)
        self.kill(instance)
        self.probes.pop(action.service, None)

    def _evict(self, action: Action) -> None:
        instance = self.instances[action.service]
        if instance.origin == "adopted":  # models unloaded, process keeps running
            if instance.pid is not None:
                self._set_usage(self._tree(instance.pid), instance.gpu_set, 0, instance.pid)
            return
        self._stop(action)

    def _release(self, action: Action) -> None:
        if action.lease is None:  # an adopted instance whose service left the profile
            self.instances.pop(action.service, None)
            return
        lease = self.leases.pop(action.lease, None)
        if lease is None:
            return
        instance = self.instances.get(lease.service)
        still_held = any(other.service == lease.service for other in self.leases.values())
        if instance is not None and not still_held:
            self.instances[lease.service] = instance.model_copy(update={"idle_since": self.now})

    def _lease(self, action: Action) -> None:
        assert action.lease is not None, "a lease action names its demand"
        demand = self.demands.pop(action.lease)
        expires = self.now + timedelta(seconds=demand.ttl_s) if demand.ttl_s else None
        self.leases[demand.id] = Lease(id=demand.id, service=demand.service, holder=demand.holder, gpu=action.gpu,
                                       gpus=action.gpus, mb=action.mb or 0, model=action.model, expires_at=expires)
        instance = self.instances.get(action.service)
        if instance is not None:
            self.instances[action.service] = instance.model_copy(update={"idle_since": None})

    def result(self) -> Snapshot:
        return self.snapshot.model_copy(update={
            "gpus": [self.gpus[i] for i in sorted(self.gpus)],
            "processes": sorted(self.processes.values(), key=lambda p: p.pid),
            "probes": dict(sorted(self.probes.items())),
            "instances": sorted(self.instances.values(), key=lambda i: i.service),
            "leases": list(self.leases.values()),
            "demands": list(self.demands.values()),
        })


def simulate(profile: Profile, snapshot: Snapshot, plan: Plan) -> Snapshot:
    host = _Host(profile, snapshot)
    for action in plan.actions:
        host.apply(action)
    return host.result()
