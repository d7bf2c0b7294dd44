"""Granting demands: Ollama-style compatibility and ``max_concurrent`` (DESIGN §3).

A demand is served by a running, healthy instance of its service when
:mod:`.compatibility` says it can be (the model matches, or the demand names
none, or the service's launch does not use ``{model}``; a lease slot is
free; the GPU asked for — one of its GPUs, for a service spanning several):
nothing but a ``lease``. A demand for another
model restarts an idle instance of ours with that model; a busy one keeps
serving and the demand waits. An unmanaged slot starts nothing: its first
lease reserves ``max_mb`` on a GPU (on each of ``gpu_count`` GPUs; evicting
if needed).

:class:`DemandGranting` works for one :class:`~.planner.Planner`: it reads
and changes the plan only through the planner's :class:`~.plan_state.PlanState`
and asks the planner to restart, place and evict through its methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reconciler.core.compatibility import capacity, gpu_matches, model_bound, model_matches, pulled, slot_free
from reconciler.core.launch import launch_spec
from reconciler.core.placement import NoPlacement
from reconciler.core.profile import Service
from reconciler.core.redaction import NO_SECRETS, Redactor
from reconciler.core.snapshot import Demand, Instance, Launch

if TYPE_CHECKING:
    from reconciler.core.planner import Planner


def describe_launch_change(old: Launch, new: Launch, redactor: Redactor = NO_SECRETS) -> str:
    """What differs between two launch specs, in words; environment values are never shown (invariant 8)."""
    changes = []
    for field in ("argv", "cwd", "port", "image"):
        before, after = getattr(old, field), getattr(new, field)
        if before != after:
            if field == "argv":
                before, after = " ".join(redactor.argv(before)), " ".join(redactor.argv(after))
            elif isinstance(before, str) or isinstance(after, str):
                before = redactor.text(before) if isinstance(before, str) else before
                after = redactor.text(after) if isinstance(after, str) else after
            changes.append(f"{field} {before!r} → {after!r}")
    for key in sorted(set(old.env) | set(new.env)):
        if key not in new.env:
            changes.append(f"env {key} removed")
        elif key not in old.env:
            changes.append(f"env {key} added")
        elif old.env[key] != new.env[key]:
            changes.append(f"env {key} changed")
    return "launch spec changed: " + "; ".join(changes)


class DemandGranting:
    """Grants one planner's demands, in request order."""

    def __init__(self, planner: Planner):
        self.planner = planner
        self.state = planner.state
        self.world = planner.world

    def grant_all(self, name: str, spec: Service, queue: list[Demand]) -> None:
        """Grant in request order; when a grant restarts the instance, the ones that waited get another go."""
        state = self.state
        mark, ready_before = len(state.pending), state.ready.get(name)
        for demand in queue:
            self.grant(name, spec, demand)
        if state.ready.get(name) != ready_before and len(state.pending) > mark:
            waited = {item.demand for item in state.pending[mark:]}
            del state.pending[mark:]
            for demand in queue:
                if demand.id in waited:
                    self.grant(name, spec, demand)

    def grant(self, name: str, spec: Service, demand: Demand) -> None:
        state, planner = self.state, self.planner
        if name in state.failed:
            return state.wait(name, state.failed[name], demand.id)
        if name in state.draining:
            return state.wait(name, f"demand {demand.id} waits for the restarted {name} "
                                    f"({state.draining[name]})", demand.id)
        instance = self.world.instances.get(name)
        unloaded = instance is not None and instance.origin == "adopted" and state.evicts(name)
        moved = state.ready_after_kind(name) == "start"
        if name in state.gone and not unloaded and not moved:  # an unloaded Ollama keeps running and serving
            return state.wait(name, f"demand {demand.id} waits: {name} is evicted by this plan", demand.id)
        if instance is None and name not in state.ready:
            return state.wait(name, f"demand {demand.id}: {name} is not running", demand.id)
        installed = self.world.installed_models(name)
        if not pulled(spec, installed, demand.model):
            listed = ", ".join(installed or []) or "none"
            if spec.pull:  # the runtime pulls it (reconciler.runtime.pulls); the lease follows once it is there
                return state.wait(name, f"demand {demand.id} waits: {name} is pulling model {demand.model} "
                                        f"(pull: true; installed: {listed})", demand.id)
            return state.wait(name, f"demand {demand.id}: {name} has not pulled model {demand.model} (installed: "
                                    f"{listed}); pull it first (ollama pull {demand.model})", demand.id, final=True)
        held = planner.held(name)
        cap = capacity(spec)
        model = state.models.get(name, instance.model if instance else None)
        if not model_matches(spec, model, demand.model):
            if not self._switch_model(name, instance, demand, model, held, cap):
                return None
            model = demand.model
        if not slot_free(spec, held):
            return state.wait(name, f"demand {demand.id} waits: {held}/{cap} leases held", demand.id)
        placed = state.gpus(name)
        if not gpu_matches(placed, demand.gpu):
            where = ",".join(map(str, placed)) if placed else "None"
            return state.wait(name, f"demand {demand.id} asks for GPU {demand.gpu}; {name} runs on GPU {where} "
                                    f"(one instance per service)", demand.id)
        waits_for = state.ready.get(name)
        if waits_for is None and not self.world.healthy(name):
            assert instance is not None
            current = instance.state if instance.state != "running" else "not healthy"
            return state.wait(name, f"demand {demand.id} waits: {name} is {current}", demand.id)
        state.granted[name] = state.granted.get(name, 0) + 1
        how = f"once {waits_for} is done" if waits_for else f"{name} is running and healthy"
        holder = f" from {demand.holder}" if demand.holder else ""
        state.add("lease", demand.id, name, f"grant demand {demand.id}{holder}: {how}, {held + 1}/{cap} leases held",
                  **planner.on_gpus(placed), lease=demand.id, model=model,
                  requires=[waits_for] if waits_for else [])
        state.touched.add(name)
        return None

    def _switch_model(
        self, name: str, instance: Instance | None, demand: Demand, model: str | None, held: int, cap: int
    ) -> bool:
        """Restart an idle instance of ours for the demand's model; a busy one keeps serving."""
        state = self.state
        planned = state.ready_after(name)
        if held > 0 or instance is None or instance.origin != "started" or (planned and planned.kind == "start"):
            who = "adopted and serves" if instance is not None and instance.origin == "adopted" else "serves"
            state.wait(name, f"demand {demand.id} needs model {demand.model}; {name} {who} {_named(model)} "
                             f"with {held}/{cap} leases held, so it waits", demand.id)
            return False
        reason = f"demand {demand.id} needs model {demand.model}; the idle instance serves {_named(model)}"
        if planned is not None and planned.kind == "restart":
            spec = self.planner.profile.services[name]
            if spec.ceiling_mb(demand.model) != spec.ceiling_mb(planned.model):  # its memory was counted for that
                state.wait(name, f"demand {demand.id} needs model {demand.model}; {name} restarts with "
                                 f"{_named(planned.model)} first ({planned.reason}), so it waits", demand.id)
                return False
            desired = launch_spec(name, self.planner.profile.services[name], planned.gpu_set, demand.model)
            assert instance.launch is not None and desired is not None
            change = describe_launch_change(instance.launch, desired, self.planner.redactor)
            state.update(planned.id, model=demand.model, reason=f"{reason}; {change}")
            state.models[name] = demand.model
        elif self.planner.restart(name, instance, demand.model, reason) is None:
            state.pending[-1] = state.pending[-1].model_copy(update={"service": name, "demand": demand.id})
            return False
        return True

    def grant_slot(self, name: str, spec: Service, queue: list[Demand], priority: int) -> None:
        """Leases on an unmanaged slot: the first one reserves max_mb on a GPU, nothing is started."""
        state, planner = self.state, self.planner
        held_leases = self.world.leases_of(name)
        cap = capacity(spec)
        for demand in queue:
            held = planner.held(name)
            if not slot_free(spec, held):
                state.wait(name, f"demand {demand.id} waits: {held}/{cap} leases held", demand.id)
                continue
            gpus, requires = (held_leases[0].gpu_set if held_leases else state.gpus(name)), []
            if not gpus and spec.max_mb > 0:
                if not self.world.gpus:
                    state.wait(name, f"needs {spec.max_mb} MB of GPU memory; this node has no GPU", demand.id)
                    continue
                if spec.gpu_count > len(self.world.gpus):
                    state.wait(name, planner.too_few_gpus(spec), demand.id)
                    continue
                placement = planner.place(name, spec, demand, priority, ())
                if isinstance(placement, NoPlacement):
                    state.wait(name, placement.reason, demand.id)
                    continue
                gpus = placement.gpus
                requires = planner.evict(placement, name, priority)
                for gpu in gpus:
                    state.free[gpu] -= spec.max_mb
                state.placed[name] = gpus
            state.granted[name] = state.granted.get(name, 0) + 1
            holder = f" from {demand.holder}" if demand.holder else ""
            each = " on each of its GPUs" if len(gpus) > 1 else ""
            reserved = f"{spec.max_mb} MB reserved{each}" if gpus else "no GPU memory"
            state.add("lease", demand.id, name, f"grant demand {demand.id}{holder}: unmanaged slot {name} "
                      f"({reserved}), {held + 1}/{cap} leases held", **planner.on_gpus(gpus), lease=demand.id,
                      mb=spec.max_mb if gpus else None, model=demand.model, requires=requires)
            state.touched.add(name)


__all__ = ["DemandGranting", "describe_launch_change", "model_bound"]


def _named(model: str | None) -> str:
    return model if model is not None else "no model named in its launch"
