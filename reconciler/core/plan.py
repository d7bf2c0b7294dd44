"""The plan: actions with reasons and ``requires`` edges, pending items, GPU totals (DESIGN §4).

A plan is data. Renderers (text, JSON, markdown) live in :mod:`reconciler.render`;
the executor runs the ``requires`` DAG; :mod:`.simulate` applies it to a snapshot.

No ``from __future__ import annotations`` here: see :mod:`.profile` (issue 10).
"""


from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from reconciler.core.empty import new_list
from reconciler.core.snapshot import GPUS_DESCRIPTION, Spanning

ActionKind = Literal["adopt", "start", "restart", "stop", "evict", "lease", "release"]
ACTION_KINDS: tuple[ActionKind, ...] = ("adopt", "start", "restart", "stop", "evict", "lease", "release")


def action_id(kind: ActionKind, subject: str) -> str:
    """The id of the action ``kind`` on ``subject`` (a service or a lease id): ``start:vllm``."""
    return f"{kind}:{subject}"


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Action(_Out, Spanning):
    id: str = Field(description="Unique within the plan, `kind:subject`, e.g. `start:vllm`, `lease:D1`.")
    kind: ActionKind
    service: str
    gpu: int | None = Field(None, description="The GPU it concerns (the first, when it spans several).")
    gpus: list[int] | None = Field(None, description=GPUS_DESCRIPTION)
    mb: int | None = Field(None, description="start/restart: reservation taken; stop/evict: reservation freed "
                           "(on each of its GPUs).")
    lease: str | None = Field(None, description="lease/release: the lease or demand id.")
    model: str | None = Field(None, description="Model it starts/serves, where relevant.")
    requires: list[str] = Field(default_factory=new_list, description="Ids of actions that must succeed first.")
    reason: str = Field(min_length=1, description="Why, in words a person can read.")


class Pending(_Out):
    service: str
    demand: str | None = Field(None, description="The demand id, when a demand is what waits.")
    reason: str
    final: bool = Field(
        False, description="Waiting will not help until the profile or the host changes (a model Ollama has "
        "not pulled, a launch that cannot work): a lease request is answered at once.")


class DemandVerdict(NamedTuple):
    """What a plan says about one demand: it waits (``pending``) or gets its lease (``planned``)."""

    state: Literal["pending", "planned"]
    reason: str
    final: bool = False  # pending, and waiting will not help


class GpuSummary(_Out):
    index: int
    total_mb: int
    free_mb: int
    free_mb_after: int


class Plan(_Out):
    format_version: Literal[1] = 1
    node: str
    profile: str
    changes: bool
    actions: list[Action]
    pending: list[Pending]
    gpus: list[GpuSummary]
    summary: dict[str, int]

    @property
    def exit_code(self) -> int:
        """DESIGN §4: 3 if anything is pending, else 2 if there are actions, else 0."""
        if self.pending:
            return 3
        return 2 if self.actions else 0

    def verdict(self, demand_id: str) -> DemandVerdict | None:
        """What this plan says about demand ``demand_id``; None when it does not mention it."""
        for item in self.pending:
            if item.demand == demand_id:
                return DemandVerdict("pending", item.reason, item.final)
        for action in self.actions:
            if action.kind == "lease" and action.lease == demand_id:
                return DemandVerdict("planned", action.reason)
        return None

    def action(self, action_id: str) -> Action | None:
        return next((a for a in self.actions if a.id == action_id), None)

    def to_json_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for action in data["actions"]:
            for key in ("mb", "lease", "model", "gpu"):
                if action.get(key) is None and key != "gpu":
                    action.pop(key, None)
        for item in data["pending"]:
            if item.get("demand") is None:
                item.pop("demand")
            if not item.get("final"):
                item.pop("final", None)
        return data
