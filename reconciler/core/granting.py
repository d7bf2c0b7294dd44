"""Granting demands: Ollama-style compatibility and ``max_concurrent`` (DESIGN §3).

A demand is served by a running, healthy instance of its service when the
model matches (or the demand names none, or the service's launch does not use
``{model}``) and a lease slot is free: nothing but a ``lease``. A demand for
another model restarts an idle instance of ours with that model; a busy one
keeps serving and the demand waits. An unmanaged slot starts nothing: its
first lease reserves ``max_mb`` on a GPU (evicting if needed).

A mixin of :class:`reconciler.core.planner.Planner`: it shares the planner's
running state (free memory, actions, what is ready) and is kept apart only to
keep each concern readable.
"""

from __future__ import annotations

from reconciler.core.launch import launch_spec
from reconciler.core.plan import Pending
from reconciler.core.profile import Service
from reconciler.core.snapshot import Demand
from reconciler.core.templates import find_placeholders
from reconciler.core.world import capacity


def model_bound(spec: Service) -> bool:
    """Whether the launch spec uses ``{model}``: only then does a demand's model matter."""
    managed = spec.managed
    if managed is None:
        return False
    texts = [getattr(managed, "args_template", ""), getattr(managed, "command_template", ""), *managed.env.values()]
    return any("model" in find_placeholders(t) for t in texts)


def describe_launch_change(old, new) -> str:
    changes = []
    for field in ("argv", "cwd", "env", "port", "image"):
        before, after = getattr(old, field), getattr(new, field)
        if before != after:
            if field == "argv":
                before, after = " ".join(before), " ".join(after)
            changes.append(f"{field} {before!r} → {after!r}")
    return "launch spec changed: " + "; ".join(changes)


class DemandGranting:
    def grant_all(self, name: str, spec: Service, queue: list[Demand]) -> None:
        """Grant in request order; when a grant restarts the instance, the ones that waited get another go."""
        mark, ready_before = len(self.pending), self.ready.get(name)
        for demand in queue:
            self.grant(name, spec, demand)
        if self.ready.get(name) != ready_before and len(self.pending) > mark:
            waited = {item.demand for item in self.pending[mark:]}
            del self.pending[mark:]
            for demand in queue:
                if demand.id in waited:
                    self.grant(name, spec, demand)

    def grant(self, name: str, spec: Service, demand: Demand) -> None:
        if name in self.failed:
            return self.wait(name, self.failed[name], demand.id)
        instance = self.world.instances.get(name)
        unloaded = instance is not None and instance.origin == "adopted" and f"evict:{name}" in self.actions
        moved = (self.ready.get(name) or "").startswith("start:")
        if name in self.gone and not unloaded and not moved:  # an unloaded Ollama keeps running and serving
            return self.wait(name, f"demand {demand.id} waits: {name} is evicted by this plan", demand.id)
        if instance is None and name not in self.ready:
            return self.wait(name, f"demand {demand.id}: {name} is not running", demand.id)
        held = self.held(name)
        cap = capacity(spec)
        model = self.models.get(name, instance.model if instance else None)
        if model_bound(spec) and demand.model is not None and demand.model != model:
            if not self._switch_model(name, instance, demand, model, held, cap):
                return
            model = demand.model
        if held >= cap:
            return self.wait(name, f"demand {demand.id} waits: {held}/{cap} leases held", demand.id)
        placed = self.gpu_of.get(name)
        if demand.gpu is not None and placed is not None and placed != demand.gpu:
            return self.wait(name, f"demand {demand.id} asks for GPU {demand.gpu}; {name} runs on GPU {placed} "
                                   f"(one instance per service)", demand.id)
        waits_for = self.ready.get(name)
        if waits_for is None and not self.world.healthy(name):
            state = instance.state if instance.state != "running" else "not healthy"
            return self.wait(name, f"demand {demand.id} waits: {name} is {state}", demand.id)
        self.granted[name] = self.granted.get(name, 0) + 1
        how = f"once {waits_for} is done" if waits_for else f"{name} is running and healthy"
        holder = f" from {demand.holder}" if demand.holder else ""
        self.add("lease", demand.id, name, f"grant demand {demand.id}{holder}: {how}, {held + 1}/{cap} leases held",
                 gpu=self.gpu_of.get(name), lease=demand.id, model=model,
                 requires=[waits_for] if waits_for else [])
        self.touched.add(name)

    def _switch_model(self, name, instance, demand, model, held, cap) -> bool:
        """Restart an idle instance of ours for the demand's model; a busy one keeps serving."""
        planned = self.actions.get(self.ready.get(name) or "")
        if held > 0 or instance is None or instance.origin != "started" or (planned and planned.kind == "start"):
            who = "adopted and serves" if instance is not None and instance.origin == "adopted" else "serves"
            self.wait(name, f"demand {demand.id} needs model {demand.model}; {name} {who} {model} "
                            f"with {held}/{cap} leases held, so it waits", demand.id)
            return False
        reason = f"demand {demand.id} needs model {demand.model}; the idle instance serves {model}"
        if planned is not None and planned.kind == "restart":
            desired = launch_spec(name, self.profile.services[name], instance.gpu, demand.model)
            self.actions[planned.id] = planned.model_copy(update={
                "model": demand.model, "reason": f"{reason}; {describe_launch_change(instance.launch, desired)}"})
            self.models[name] = demand.model
        elif self._restart(name, instance, demand.model, reason) is None:
            self.pending[-1] = Pending(service=name, demand=demand.id, reason=self.pending[-1].reason)
            return False
        return True

    def grant_slot(self, name: str, spec: Service, queue: list[Demand], priority: int) -> None:
        """Leases on an unmanaged slot: the first one reserves max_mb on a GPU, nothing is started."""
        held_leases = self.world.leases_of(name)
        cap = capacity(spec)
        for demand in queue:
            held = self.held(name)
            if held >= cap:
                self.wait(name, f"demand {demand.id} waits: {held}/{cap} leases held", demand.id)
                continue
            gpu, requires = (held_leases[0].gpu if held_leases else self.gpu_of.get(name)), []
            if gpu is None and spec.max_mb > 0:
                if not self.world.gpus:
                    self.wait(name, f"needs {spec.max_mb} MB of GPU memory; this node has no GPU", demand.id)
                    continue
                placement = self._place(name, spec, demand, priority, None)
                if isinstance(placement, str):
                    self.wait(name, placement, demand.id)
                    continue
                gpu = placement.gpu
                requires = self._evict(placement, name, priority)
                self.free[gpu] -= spec.max_mb
                self.gpu_of[name] = gpu
            self.granted[name] = self.granted.get(name, 0) + 1
            holder = f" from {demand.holder}" if demand.holder else ""
            reserved = f"{spec.max_mb} MB reserved" if gpu is not None else "no GPU memory"
            self.add("lease", demand.id, name, f"grant demand {demand.id}{holder}: unmanaged slot {name} "
                     f"({reserved}), {held + 1}/{cap} leases held", gpu=gpu, lease=demand.id,
                     mb=spec.max_mb if gpu is not None else None, model=demand.model, requires=requires)
            self.touched.add(name)
