"""A refused lease request → its HTTP status code.

The leasing service (:mod:`reconciler.runtime.leasing`) says *why* a request is
not granted as a :class:`~reconciler.errors.Refusal`; this table says what
HTTP calls that: 404 for a service the profile does not have, 422 for a GPU
this node does not have, 429 when the service's queue is full (retry later),
503 for everything that may change by waiting (not granted within
``wait_s``, not enough VRAM now, busy, shutting down).
"""

from __future__ import annotations

from fastapi import HTTPException

from reconciler.errors import LeaseRefused, OperatorRefused, Refusal

STATUS: dict[Refusal, int] = {
    Refusal.UNKNOWN_SERVICE: 404,
    Refusal.UNKNOWN_GPU: 422,
    Refusal.QUEUE_FULL: 429,
    Refusal.CANNOT_BE_MET: 503,
    Refusal.ENDED: 503,
    Refusal.NO_VRAM: 503,
    Refusal.NOT_OBSERVED: 503,
    Refusal.BUSY: 503,
    Refusal.CLOSING: 503,
}


def status_of(refused: LeaseRefused) -> int:
    return STATUS[refused.refusal]


def http_error(refused: LeaseRefused) -> HTTPException:
    """The HTTP answer to a refused request: its status and the reason in words."""
    return HTTPException(status_of(refused), refused.detail)


def operator_status(refused: OperatorRefused) -> int:
    """An operator's verb refused: 404 for a service the profile does not have, 409 for one it may not touch
    (an adopted instance is never signalled)."""
    return 404 if refused.kind == "unknown" else 409
