"""What the text and markdown renderers share: symbols, labels, the summary phrase.

Symbols, one per action kind (and one for pending items)::

    =  adopt     a healthy listener becomes an instance; nothing is started
    +  start     a new instance
    ~  restart   its launch spec changed (or it must serve another model)
    -  stop      not wanted any more
    !  evict     stopped (or unloaded) to make room for a more important service
    >  lease     a demand is granted
    <  release   a lease (or an adopted instance) is let go; no process is touched
    ?  pending   wanted, but cannot be reached by this plan
"""

from __future__ import annotations

from reconciler.core.plan import ACTION_KINDS, Action, Pending, Plan

SYMBOLS: dict[str, str] = {
    "adopt": "=",
    "start": "+",
    "restart": "~",
    "stop": "-",
    "evict": "!",
    "lease": ">",
    "release": "<",
}
PENDING_SYMBOL = "?"


def label(action: Action) -> str:
    """The action id, plus the service (and model) when the id does not say them."""
    extra = []
    if action.id != f"{action.kind}:{action.service}":
        extra.append(action.service)
    if action.model:
        extra.append(f"model {action.model}")
    return f"{action.id} ({', '.join(extra)})" if extra else action.id


def where(action: Action) -> str:
    """``GPU 0``; ``GPU 0,1`` for an action on a service spanning several GPUs; ``-`` for none."""
    return f"GPU {','.join(map(str, action.gpu_set))}" if action.gpu_set else "-"


def megabytes(action: Action) -> str:
    """``6144 MB``; ``2×20000 MB`` for an action on two GPUs (its ``mb`` on each)."""
    if action.mb is None:
        return ""
    count = len(action.gpu_set)
    return f"{count}×{action.mb} MB" if count > 1 else f"{action.mb} MB"


def pending_subject(item: Pending) -> str:
    return f"{item.service} (demand {item.demand})" if item.demand else item.service


def _count(kind: str, n: int) -> str:
    if kind == "lease":
        return f"{n} lease{'' if n == 1 else 's'} to grant"
    return f"{n} to {kind}"


def summary_phrase(plan: Plan, *, zeros: bool = True) -> str:
    """``1 to start, 1 to evict, 1 lease to grant; 1 pending`` (every kind when ``zeros``)."""
    counts = [_count(kind, plan.summary.get(kind, 0)) for kind in ACTION_KINDS
              if zeros or plan.summary.get(kind, 0)]
    head = ", ".join(counts) if counts else "no actions"
    return f"{head}; {len(plan.pending)} pending"


def converged(plan: Plan) -> bool:
    return not plan.actions and not plan.pending
