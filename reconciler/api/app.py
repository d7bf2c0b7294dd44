"""The application factory: routes, middleware, error answers, the dashboard's files.

Layers, outermost first: :class:`.auth.BearerAuth` (a call without the token,
when one is set, never reaches anything else), :class:`.limits.BodyLimit`,
:class:`.fastlane.FastLane` (the four lease routes' plain case, the same route
functions without the framework's routing), then FastAPI's routing and validation, where :class:`.bodies.TextRoute`
refuses a JSON body holding a lone surrogate before the route's models see
it. Every error is ``{"detail": ...}``; an unexpected exception is a 500 that
says what went wrong, and a store or host error a 503 (try again), never a
dropped connection. Answers are written by :class:`.bodies.SafeJSONResponse`,
which cannot fail on a string that is not text (it escapes it).

``GET /`` serves ``static/index.html`` (the dashboard) and ``/static/…`` the
files beside it, when they exist; ``GET /openapi.json`` the API's OpenAPI
document, generated from the request and response models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import reconciler
from reconciler.api import cluster, compat, native, services
from reconciler.api.auth import BearerAuth
from reconciler.api.bodies import SafeJSONResponse, escaped
from reconciler.api.context import ApiContext
from reconciler.api.fastlane import FastLane, error_answer
from reconciler.api.limits import BodyLimit
from reconciler.api.refusals import operator_status
from reconciler.errors import OperatorRefused, ReconcilerError

STATIC_DIR = Path(__file__).parent / "static"
ECHO_CHARS = 200  # how much of a bad input a 422 repeats
UNPARSABLE = "There was an error parsing the body"
log = logging.getLogger("reconciler.api")


def create_app(context: ApiContext, token: str | None = None) -> FastAPI:
    app = FastAPI(
        title="reconciler",
        version=getattr(reconciler, "__version__", "0"),
        description="Leases, status and events of a declarative reconciler for GPU services; "
        "cf-orch compatible routes under /api.",
        docs_url="/docs", redoc_url=None, default_response_class=SafeJSONResponse,
    )
    app.state.context = context
    app.include_router(native.router)
    app.include_router(cluster.router)
    app.include_router(compat.router)
    app.include_router(services.router)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": [problem(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        if exc.status_code == 400 and detail == UNPARSABLE:  # FastAPI's words for a body json cannot read
            detail = "the body is not a JSON document this API can read (invalid UTF-8, or nested too deeply)"
            exc = StarletteHTTPException(400, detail, exc.headers)
        return error_answer(exc)

    @app.exception_handler(OperatorRefused)  # before ReconcilerError's (its base): a 404 or 409, not a 503
    async def _operator_refused(request: Request, exc: OperatorRefused) -> Response:
        return SafeJSONResponse({"detail": exc.detail}, status_code=operator_status(exc))

    @app.exception_handler(ReconcilerError)
    async def _host_error(request: Request, exc: ReconcilerError) -> Response:
        return error_answer(exc)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client went away (or was cut off): nobody reads this

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> SafeJSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return SafeJSONResponse({"detail": f"internal error: {type(exc).__name__}: {escaped(str(exc))}"},
                                status_code=500)

    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        if not index.is_file():
            return SafeJSONResponse({"detail": "no dashboard installed; see /docs and /v1/status"}, status_code=404)
        return FileResponse(index, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(FastLane, context=context)  # innermost: behind the token and the body limit
    app.add_middleware(BodyLimit)
    app.add_middleware(BearerAuth, token=token)
    return app


def problem(error: dict[str, Any]) -> dict[str, Any]:
    """One validation error as ``{type, loc, msg, input}``, in words a client author can act on."""
    loc = [escaped(part) if isinstance(part, str) else part for part in error.get("loc", ())]
    out: dict[str, Any] = {"type": error.get("type"), "loc": loc, "msg": escaped(str(error.get("msg", "invalid")))}
    if loc[:1] == ["body"] and out["type"] == "json_invalid":  # FastAPI says only "JSON decode error"
        out["msg"] = f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'unreadable')}"
    if loc == ["body"] and error.get("type") == "model_attributes_type":
        out["msg"] = "the body must be a JSON object, sent with Content-Type: application/json"
    elif loc == ["body"] and error.get("type") == "missing":
        out["msg"] = "a JSON object body is required"
    elif "input" in error:
        out["input"] = echo(error["input"])
    return out


def echo(value: Any) -> Any:
    """A bad input as a 422 repeats it: as it was when short, valid JSON and text, else as shortened text
    (a string that is not text, e.g. with a lone surrogate, is repeated escaped)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError):  # NaN, infinity, bytes, objects; UnicodeEncodeError: not text
        text = escaped(repr(value) if not isinstance(value, str) else value)
        return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"
    return value if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"
