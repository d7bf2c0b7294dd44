"""What one reconcile pass did: the plan it acted on, what it observed, each action's outcome.

An :class:`Outcome` is one action's result: ``done``; ``failed`` (it was tried
and did not work — ``detail`` says why); ``skipped`` (not tried because an
action it requires failed or was skipped); ``deferred`` (not tried now: its
service is backing off after failures, or a start outlived the caller's
deadline and a later pass keeps waiting for it). ``stalled`` names services
held back by their backoff, with the reason.

A :class:`PassReport` from :meth:`Runtime.converge` is the last pass's, with
the earlier passes in ``history`` (oldest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from reconciler.core.plan import Plan
from reconciler.core.snapshot import Snapshot

OutcomeStatus = Literal["done", "failed", "skipped", "deferred"]
OUTCOME_STATUSES: tuple[OutcomeStatus, ...] = ("done", "failed", "skipped", "deferred")


@dataclass(frozen=True)
class Outcome:
    status: OutcomeStatus
    detail: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def to_json_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, "duration_s": round(self.duration_s, 3)}


@dataclass(frozen=True)
class PassReport:
    plan: Plan
    snapshot: Snapshot
    outcomes: dict[str, Outcome]
    stalled: dict[str, str] = field(default_factory=dict)
    history: tuple[PassReport, ...] = ()

    @property
    def passes(self) -> tuple[PassReport, ...]:
        """Every pass, oldest first, this one last."""
        return (*self.history, self)

    @property
    def converged(self) -> bool:
        """Nothing left to do: the plan had no actions, or every one of them is done."""
        return all(self.outcomes.get(a.id, Outcome("skipped")).ok for a in self.plan.actions)

    @property
    def exit_code(self) -> int:
        """Like ``plan``'s (DESIGN §4): 3 if anything is pending, 2 if an action is not done, else 0."""
        if self.plan.pending:
            return 3
        return 0 if self.converged else 2

    def counts(self) -> dict[str, int]:
        """Outcomes by status over every pass."""
        counts: dict[str, int] = dict.fromkeys(OUTCOME_STATUSES, 0)
        for report in self.passes:
            for outcome in report.outcomes.values():
                counts[outcome.status] += 1
        return counts

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "exit_code": self.exit_code,
            "converged": self.converged,
            "passes": [
                {
                    "plan": report.plan.to_json_dict(),
                    "outcomes": {k: v.to_json_dict() for k, v in report.outcomes.items()},
                    "stalled": dict(report.stalled),
                }
                for report in self.passes
            ],
            "pending": [p.model_dump(mode="json", exclude_none=True) for p in self.plan.pending],
            "stalled": dict(self.stalled),
        }
