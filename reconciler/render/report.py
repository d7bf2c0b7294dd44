"""What ``reconciler apply`` did, as text or JSON.

One line per action of every pass that acted — its symbol, id, outcome,
duration and detail — then what stays pending and which services are
stalled, then a summary line with the verdict that matches the exit code
(converged, actions remain, something is pending). ``json`` is
:meth:`~reconciler.core.report.PassReport.to_json_dict`.
"""

from __future__ import annotations

import json

from reconciler.core.report import PassReport
from reconciler.render.common import PENDING_SYMBOL, SYMBOLS, pending_subject


def render_report(report: PassReport, fmt: str) -> str:
    """What apply did: one line per action and pass, pending and stalled services, a summary."""
    if fmt == "json":
        return json.dumps(report.to_json_dict(), indent=2) + "\n"
    lines: list[str] = []
    for number, one in enumerate(report.passes, 1):
        if not one.plan.actions:
            continue
        lines.append(f"Pass {number}:")
        for action in one.plan.actions:
            outcome = one.outcomes[action.id]
            took = f" in {outcome.duration_s:.1f} s" if outcome.status in ("done", "failed") else ""
            lines.append(f"  {SYMBOLS[action.kind]} {action.id}  {outcome.status}{took}: {outcome.detail}")
    if report.plan.pending:
        lines.append("Pending:")
        lines += [f"  {PENDING_SYMBOL} {pending_subject(p)}: {p.reason}" for p in report.plan.pending]
    if report.stalled:
        lines.append("Stalled:")
        lines += [f"  {service}: {why}" for service, why in sorted(report.stalled.items())]
    counts = report.counts()
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    verdict = {0: "converged", 2: "actions remain", 3: "something is pending"}[report.exit_code]
    if not any(counts.values()):
        lines.append(f"No changes. The host matches the profile{'' if not report.plan.pending else ' where it can'}.")
    lines.append(f"Apply: {summary}; {len(report.plan.pending)} pending — {verdict}.")
    return "\n".join(lines) + "\n"
