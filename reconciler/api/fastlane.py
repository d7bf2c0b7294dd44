"""The lease hot path without the framework's routing: the same handlers, half the cost around them.

Taking and giving back a lease is what clients do thousands of times a second;
everything else (status, plan, events, the operator's verbs) is rare. Measured
on this repository's machine, FastAPI's routing, dependency solving, body
parsing and response serialisation cost ~0.12 ms of CPU per request around a
route that does nothing — as much as the lease itself, its SQLite commit and
its events together (README, "Performance").

:class:`FastLane` is an ASGI middleware inside the authentication and body-size
layers (``app.py``: a request reaches it only with the token and within the
limit). It recognises the four hot routes by method and exact path —
``POST /v1/leases``, ``DELETE /v1/leases/{id}``, ``POST /api/leases``,
``DELETE /api/leases/{id}`` — and calls **the same route functions** FastAPI
would (:mod:`.native`, :mod:`.compat`), with the body validated by the same
pydantic models (``model_validate_json``) and the answer written by the same
:class:`~.bodies.SafeJSONResponse`. It answers only the plain case: a body with
``Content-Type: application/json`` that validates. Anything else — a body that
does not validate (or holds a lone surrogate, which the JSON parser refuses),
another content type, another path — is handed to FastAPI untouched, the body
replayed, so every error answer is exactly the framework's (422 with located
problems, 400, …). An ``HTTPException`` or a host error raised by the route is
answered as ``app.py``'s handlers answer it (:func:`error_answer`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reconciler.api import compat, native
from reconciler.api.bodies import SafeJSONResponse
from reconciler.api.context import ApiContext
from reconciler.api.models import LeaseRequest
from reconciler.errors import ReconcilerError

JSON = b"application/json"
Handler = Callable[[Request, ApiContext, Any], Awaitable[Any]]


def error_answer(exc: Exception) -> Response:
    """An ``HTTPException`` or a host error as the API answers it (``{"detail": …}``; see ``app.py``)."""
    if isinstance(exc, StarletteHTTPException):
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    return SafeJSONResponse({"detail": f"the reconciler could not do it now: {exc}"}, status_code=503)


async def _native_lease(request: Request, ctx: ApiContext, body: Any) -> Any:
    return await native.create_lease(body, request, ctx)


async def _native_release(request: Request, ctx: ApiContext, lease_id: Any) -> Any:
    return await native.release_lease(lease_id, request, ctx)


async def _vram_lease(request: Request, ctx: ApiContext, body: Any) -> Any:
    return await compat.request_lease(body, request, ctx)


async def _vram_release(request: Request, ctx: ApiContext, lease_id: Any) -> Any:
    return await compat.release_lease(lease_id, request, ctx)


# (method, path) → (body model, route); a path ending in "/" takes one more segment, the lease id
ROUTES: dict[tuple[str, str], tuple[type[BaseModel] | None, Handler]] = {
    ("POST", "/v1/leases"): (LeaseRequest, _native_lease),
    ("DELETE", "/v1/leases/"): (None, _native_release),
    ("POST", "/api/leases"): (compat.VramLeaseRequest, _vram_lease),
    ("DELETE", "/api/leases/"): (None, _vram_release),
}


class FastLane:
    """ASGI middleware: the hot lease routes answered directly (see the module docstring)."""

    def __init__(self, app: ASGIApp, context: ApiContext):
        self.app = app
        self.context = context

    def _route(self, scope: Scope) -> tuple[type[BaseModel] | None, Handler, str | None] | None:
        method, path = scope["method"], scope["path"]
        found = ROUTES.get((method, path))
        if found is not None and found[0] is not None:
            return found[0], found[1], None
        head, sep, lease_id = path.rpartition("/")
        found = ROUTES.get((method, head + sep))
        if found is None or found[0] is not None or not lease_id:
            return None
        return None, found[1], lease_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        model, handler, lease_id = route
        argument: Any = lease_id
        if model is not None:
            if _content_type(scope) != JSON:
                return await self.app(scope, receive, send)
            try:
                raw = await _body(receive)
            except StarletteHTTPException as exc:  # the body-size layer's 413, raised from receive
                return await error_answer(exc)(scope, receive, send)
            if raw is None:  # the client went away before its body came: nobody reads an answer
                return None
            receive = _replaying(raw, receive)
            try:
                argument = model.model_validate_json(raw)
            except ValidationError:  # the framework's own 422 (or 400), exactly
                return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            result = await handler(request, self.context, argument)
        except (StarletteHTTPException, HTTPException, ReconcilerError) as exc:
            answer = error_answer(exc)
        else:
            if isinstance(result, Response):
                answer = result
            else:
                content = result.model_dump(mode="json", by_alias=True) if isinstance(result, BaseModel) else result
                answer = SafeJSONResponse(content)
        await answer(scope, receive, send)
        return None


def _content_type(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bytes(value).strip().lower()
    return None


async def _body(receive: Receive) -> bytes | None:
    """The whole request body (the body-size layer outside bounds it); None when the client went away."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(raw: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read already, then what the client sends next (its disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay
