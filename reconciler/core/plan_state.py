"""The planner's running state: one object, read through typed questions.

While it walks the world, the planner keeps one account of what the plan so
far does: the actions emitted (by id, in emission order), what waits and why,
each GPU's running ``free`` figure, leases granted and released, which
action each service waits for before it is ready, the model and GPUs each
service will have (one, or every GPU of a service spanning several), which
services the plan already touches (so never evicts) or removes, and which
cannot be reached at all (so their dependents say why). :class:`PlanState`
holds all of it; the planner (:mod:`.planner`) and the demand granting
(:mod:`.granting`) read and change it only through it.

Questions about the plan are asked of typed fields — "does the plan evict
vllm?", "is tts ready only after an adopt?" — never by parsing action ids.
"""

from __future__ import annotations

from typing import Any

from reconciler.core.plan import Action, ActionKind, Pending, action_id


class PlanState:
    """The plan so far (see the module's docstring). A plain class, not a dataclass: :mod:`reconciler.core`."""

    def __init__(self) -> None:
        self.actions: dict[str, Action] = {}
        self.pending: list[Pending] = []
        self.free: dict[int, int] = {}  # GPU → MB free once the plan so far is applied
        self.granted: dict[str, int] = {}  # service → leases granted in this plan
        self.released: set[str] = set()  # lease ids released in this plan
        self.ready: dict[str, str | None] = {}  # service → action it waits for (None: live already)
        self.models: dict[str, str | None] = {}  # service → model it will serve
        self.placed: dict[str, tuple[int, ...]] = {}  # service → GPUs it will be on (ascending)
        self.touched: set[str] = set()  # services with an action in this plan: not evictable
        self.gone: set[str] = set()  # services stopped or evicted in this plan
        self.failed: dict[str, str] = {}  # services that cannot be reached → why
        self.draining: dict[str, str] = {}  # busy services whose restart waits → why
        self.respanned: dict[str, str] = {}  # stopped to start again on more or fewer GPUs → why

    # --- emitting ----------------------------------------------------------------

    def add(self, kind: ActionKind, subject: str, service: str, reason: str, **fields: Any) -> str:
        """Emit (or replace) the action ``kind:subject``; returns its id."""
        new_id = action_id(kind, subject)
        self.actions[new_id] = Action(id=new_id, kind=kind, service=service, reason=reason, **fields)
        return new_id

    def update(self, existing: str, **fields: Any) -> None:
        """Change fields of an emitted action (its requires, its model and reason)."""
        self.actions[existing] = self.actions[existing].model_copy(update=fields)

    def wait(self, service: str, reason: str, demand: str | None = None, *, final: bool = False) -> None:
        self.pending.append(Pending(service=service, demand=demand, reason=reason, final=final))

    # --- questions -------------------------------------------------------------------

    def action(self, kind: ActionKind, subject: str) -> Action | None:
        """The action ``kind`` on ``subject`` (a service, or a lease id), if the plan has one."""
        return self.actions.get(action_id(kind, subject))

    def evicts(self, service: str) -> bool:
        return self.action("evict", service) is not None

    def ready_after(self, service: str) -> Action | None:
        """The action ``service`` waits for before it is ready (None: it is live already, or not planned)."""
        waits_for = self.ready.get(service)
        return self.actions.get(waits_for) if waits_for is not None else None

    def ready_after_kind(self, service: str) -> ActionKind | None:
        action = self.ready_after(service)
        return action.kind if action is not None else None

    def of_kind(self, kind: ActionKind, gpu: int | None = None) -> list[Action]:
        """Emitted actions of ``kind`` (on ``gpu``, one of their GPUs, when given), in emission order."""
        return [a for a in self.actions.values() if a.kind == kind and (gpu is None or gpu in a.gpu_set)]

    def gpus(self, service: str) -> tuple[int, ...]:
        """The GPUs ``service`` will be on once the plan so far is applied (none: no GPU, or not placed)."""
        return self.placed.get(service, ())

    def gpu(self, service: str) -> int | None:
        """The (first) GPU ``service`` will be on."""
        span = self.placed.get(service, ())
        return span[0] if span else None
