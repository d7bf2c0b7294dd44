"""The plan as a pull-request comment (GitHub-flavoured markdown).

A heading with the summary (only the kinds present, and the pending count), a
line naming the profile and node, a table of the actions in order (symbol,
action, kind, service, GPU, MB, after, reason), a bulleted pending list, and a
table of GPU memory before and after. A converged plan is the heading
"No changes" and the GPU table. Table cells escape ``|`` and newlines; ids and
names are set in code spans.
"""

from __future__ import annotations

from reconciler.core.plan import Plan
from reconciler.render.common import PENDING_SYMBOL, SYMBOLS, converged, pending_subject, summary_phrase


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{_cell(text)}{pad}{fence}"


def render_markdown(plan: Plan) -> str:
    if converged(plan):
        heading = "### reconciler plan: no changes"
        intro = f"Profile {_code(plan.profile)} on node {_code(plan.node)}: the host matches the profile."
    else:
        heading = f"### reconciler plan: {summary_phrase(plan, zeros=False)}"
        intro = f"Profile {_code(plan.profile)} on node {_code(plan.node)}."
    lines = [heading, "", intro]
    if plan.actions:
        lines += ["", "| | Action | Kind | Service | GPU | MB | After | Reason |",
                  "|---|---|---|---|--:|--:|---|---|"]
        for a in plan.actions:
            gpu = ",".join(map(str, a.gpu_set))
            mb = "" if a.mb is None else str(a.mb) + (f" × {len(a.gpu_set)}" if len(a.gpu_set) > 1 else "")
            after = ", ".join(_code(r) for r in a.requires)
            lines.append(f"| {SYMBOLS[a.kind]} | {_code(a.id)} | {a.kind} | {_code(a.service)} | {gpu} | {mb} "
                         f"| {after} | {_cell(a.reason)} |")
    if plan.pending:
        lines += ["", f"**Pending** ({len(plan.pending)}):", ""]
        lines += [f"- {PENDING_SYMBOL} **{_cell(pending_subject(p))}**: {_cell(p.reason)}" for p in plan.pending]
    lines += [""]
    if plan.gpus:
        lines += ["| GPU | Total MB | Free MB | Free MB after |", "|--:|--:|--:|--:|"]
        lines += [f"| {g.index} | {g.total_mb} | {g.free_mb} | {g.free_mb_after} |" for g in plan.gpus]
    else:
        lines.append("No GPUs (CPU only).")
    return "\n".join(lines) + "\n"
