"""The Terraform-style text plan.

Layout (sections are left out when empty)::

    Plan for profile single-gpu-8gb on node local
    Symbols: ! evict  + start  > lease

    Actions, in order:
      ! evict:comfyui     GPU 0  6144 MB  frees 6144 MB on GPU 0 for vllm …
      + start:vllm        GPU 0  6500 MB  wanted (demand D1); …  [after: evict:comfyui]
      > lease:D1 (vllm)   GPU 0           grant demand D1 …  [after: start:vllm]

    Pending:
      ? vllm (demand D2): needs 6500 MB on GPU 0, 2292 free; …

    GPUs:
      GPU 0: 8192 MB total, 1948 free → 1592 free after

    Plan: 0 to adopt, 1 to start, 0 to restart, 0 to stop, 1 to evict, 1 lease to grant, 0 to release; 1 pending.

One line per action: its symbol (legend in :mod:`.common`: ``=`` adopt, ``+``
start, ``~`` restart, ``-`` stop, ``!`` evict, ``>`` lease, ``<`` release, ``?``
pending), its id (with the service and model when the id does not name them),
the GPU (``-`` for none; ``GPU 0,1`` for a service spanning several), the MB
it reserves (start, restart, slot lease) or frees (stop, evict) — ``2×20000
MB`` on each of two GPUs —, its reason, and the actions it waits for as
``[after: …]``.
Actions are listed in the plan's order, which respects ``requires``. A plan
with nothing to do and nothing pending ends with "No changes. The host matches
the profile." instead of the summary line.

Colour (ANSI SGR) only when asked; the CLI asks on a TTY without ``NO_COLOR``.
"""

from __future__ import annotations

from reconciler.core.plan import ACTION_KINDS, Plan
from reconciler.render.common import (
    PENDING_SYMBOL,
    SYMBOLS,
    converged,
    label,
    megabytes,
    pending_subject,
    summary_phrase,
    where,
)

NO_CHANGES = "No changes. The host matches the profile."

_COLORS = {
    "adopt": "36",  # cyan
    "start": "32",  # green
    "restart": "33",  # yellow
    "stop": "31",  # red
    "evict": "1;31",  # bold red
    "lease": "34",  # blue
    "release": "35",  # magenta
    "pending": "1;33",  # bold yellow
    "bold": "1",
    "dim": "2",
}


class _Paint:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, style: str, text: str) -> str:
        if not self.enabled or not text:
            return text
        return f"\x1b[{_COLORS[style]}m{text}\x1b[0m"


def render_text(plan: Plan, *, color: bool = False) -> str:
    paint = _Paint(color)
    lines = [paint("bold", f"Plan for profile {plan.profile} on node {plan.node}")]
    used = [kind for kind in ACTION_KINDS if plan.summary.get(kind)]
    if used or plan.pending:
        legend = [f"{paint(k, SYMBOLS[k])} {k}" for k in used]
        if plan.pending:
            legend.append(f"{paint('pending', PENDING_SYMBOL)} pending")
        lines.append("Symbols: " + "  ".join(legend))
    if plan.actions:
        lines += ["", "Actions, in order:", *_action_lines(plan, paint)]
    if plan.pending:
        lines += ["", "Pending:"]
        for item in plan.pending:
            lines.append(f"  {paint('pending', PENDING_SYMBOL)} {pending_subject(item)}: {item.reason}")
    lines += ["", "GPUs:", *_gpu_lines(plan)]
    lines.append("")
    if converged(plan):
        lines.append(paint("bold", NO_CHANGES))
    else:
        lines.append(paint("bold", f"Plan: {summary_phrase(plan)}."))
    return "\n".join(lines) + "\n"


def _action_lines(plan: Plan, paint: _Paint) -> list[str]:
    texts = [(label(a), where(a), megabytes(a)) for a in plan.actions]
    widths = [max(len(row[i]) for row in texts) for i in (0, 1, 2)]
    out = []
    for action, (name, gpu, mb) in zip(plan.actions, texts, strict=True):
        cells = [name.ljust(widths[0]), gpu.ljust(widths[1])]
        if widths[2]:
            cells.append(mb.rjust(widths[2]))
        after = f"  [after: {', '.join(action.requires)}]" if action.requires else ""
        symbol = paint(action.kind, SYMBOLS[action.kind])
        out.append(f"  {symbol} {paint(action.kind, cells[0])}  {'  '.join(cells[1:])}  "
                   f"{action.reason}{paint('dim', after)}")
    return out


def _gpu_lines(plan: Plan) -> list[str]:
    if not plan.gpus:
        return ["  none (CPU only)"]
    return [f"  GPU {g.index}: {g.total_mb} MB total, {g.free_mb} free → {g.free_mb_after} free after"
            for g in plan.gpus]
