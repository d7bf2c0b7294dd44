"""The operator's routes: stop, start, restart, reset a service, take everything down, read a service's log.

    POST /v1/services/{name}/stop          hold it stopped (survives restarts) until start
    POST /v1/services/{name}/start         lift the hold
    POST /v1/services/{name}/restart       ?now=true: even while it holds leases
    POST /v1/services/{name}/reset         forget its backoff (a stall too): tried at the next pass
    POST /v1/down                          hold everything but adopted instances; ours stop, dependents first
    POST /v1/up                            lift every hold (``reconciler start --all``)
    GET  /v1/services/{name}/logs?tail=N   the last N lines of its log file

What each verb means is :mod:`reconciler.runtime.controls`'s; this module is
HTTP only. The mutating calls wait for the pass that carries them out, up to
``wait_s`` (default 60), and answer :class:`~.models.OperatorDone` — ``done:
false`` with the reason when it goes on after that (a restart waiting for
leases to end, a stop that takes long). An unknown service is a 404, an
adopted one (never signalled) a 409 (``OperatorRefused``, answered by the
app's handler: :func:`.refusals.operator_status`). Token rules are the API's: with a
token, every call here needs it — the log too, since a service may print
what its environment holds.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query

from reconciler.api.bodies import TextRoute
from reconciler.api.context import ApiContext, context
from reconciler.api.models import LogLines, OperatorDone, Problem
from reconciler.runtime import controls, logs

router = APIRouter(route_class=TextRoute, tags=["operator"])
Ctx = Annotated[ApiContext, Depends(context)]
Wait = Annotated[float, Query(ge=0, le=600, description="How long to wait for it to be carried out (seconds).")]
_ERRORS: dict[int | str, dict[str, type[Problem]]] = {404: {"model": Problem}, 409: {"model": Problem}}


def _out(done: controls.Done) -> OperatorDone:
    return OperatorDone(service=done.service, verb=done.verb, message=done.message, done=done.done,
                        stopped=done.stopped, left=done.left)


@router.post("/v1/services/{name}/stop", response_model=OperatorDone, responses=_ERRORS)
async def stop(name: str, ctx: Ctx, wait_s: Wait = controls.DEFAULT_WAIT_S) -> OperatorDone:
    """Stop the service (and what depends on it) and keep it stopped, across restarts, until ``start``."""
    return _out(await controls.stop(ctx.runtime, ctx.profile(), name, wait_s))


@router.post("/v1/services/{name}/start", response_model=OperatorDone, responses=_ERRORS)
async def start(name: str, ctx: Ctx, wait_s: Wait = controls.DEFAULT_WAIT_S) -> OperatorDone:
    """Lift a ``stop`` (or ``down``): the service runs again as the profile wants it."""
    return _out(await controls.start(ctx.runtime, ctx.profile(), name, wait_s))


@router.post("/v1/services/{name}/restart", response_model=OperatorDone, responses=_ERRORS)
async def restart(
    name: str, ctx: Ctx, wait_s: Wait = controls.DEFAULT_WAIT_S,
    now: Annotated[bool, Query(description="Restart even while it holds leases (they end with it).")] = False,
) -> OperatorDone:
    """Restart our instance: once it is idle, or at once with ``now=true``."""
    return _out(await controls.restart(ctx.runtime, ctx.profile(), name, now=now, wait_s=wait_s))


@router.post("/v1/services/{name}/reset", response_model=OperatorDone, responses=_ERRORS)
async def reset(name: str, ctx: Ctx) -> OperatorDone:
    """Forget the service's failures (a backoff or a stall): it is tried at the next pass."""
    return _out(await controls.reset(ctx.runtime, ctx.profile(), name))


@router.post("/v1/down", response_model=OperatorDone)
async def down(ctx: Ctx, wait_s: Wait = controls.DEFAULT_WAIT_S) -> OperatorDone:
    """Stop every instance this reconciler started, dependents first, and keep them stopped; adopted ones stay."""
    return _out(await controls.down(ctx.runtime, ctx.profile(), wait_s))


@router.post("/v1/up", response_model=OperatorDone)
async def up(ctx: Ctx, wait_s: Wait = controls.DEFAULT_WAIT_S) -> OperatorDone:
    """Lift every hold (``stop``, ``down``): the services run again as the profile wants them."""
    return _out(await controls.start(ctx.runtime, ctx.profile(), None, wait_s))


@router.get("/v1/services/{name}/logs", response_model=LogLines, responses=_ERRORS)
async def service_logs(
    name: str, ctx: Ctx,
    tail: Annotated[int, Query(ge=0, le=logs.MAX_LINES, description="How many of the last lines.")] = 100,
) -> LogLines:
    """The last ``tail`` lines of the service's log file (its stdout and stderr, a header per launch)."""
    profile, store = ctx.profile(), ctx.runtime.store
    instance = store.get_instance(name)
    if name not in profile.services and instance is None:
        raise HTTPException(404, f"no service {name!r} in profile {profile.name!r}")
    path = logs.log_path(ctx.runtime.state_dir, name)
    try:
        lines = logs.tail(path, tail)
        size = path.stat().st_size
    except FileNotFoundError:
        raise HTTPException(404, logs.missing_reason(name, path, instance.container if instance else None)) from None
    except OSError as exc:
        raise HTTPException(503, f"cannot read {path}: {exc.strerror or exc}") from None
    return LogLines(service=name, file=str(path), lines=lines, size=size)
