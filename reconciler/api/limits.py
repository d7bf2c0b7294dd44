"""Request bodies have a size limit: a huge body is refused (413) before it is read into memory.

Every body this API takes is a small JSON object, so :data:`MAX_BODY_BYTES`
is generous. A declared ``Content-Length`` over the limit is refused at once;
a chunked body is counted as it arrives and refused once it passes the limit.
Either way the rest of the body is read and dropped (up to :data:`DRAIN_BYTES`),
never kept, so that the client gets to read the 413.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024
DRAIN_BYTES = 4 * 1024 * 1024  # a refused body is read and dropped up to this much (see BodyLimit._drain)


class _TooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException, so the framework answers it (413) like its own."""


class BodyLimit:
    """ASGI middleware enforcing :data:`MAX_BODY_BYTES` on request bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await self._refuse(send, 400, "Content-Length is not a number")
                if declared > self.max_bytes:
                    await self._drain(receive, 0)
                    return await self._refuse(send, 413, self._message())
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body"):
                        await self._drain(receive, seen)
                    raise _TooLarge(413, self._message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, 413, self._message())

    @staticmethod
    async def _drain(receive: Receive, seen: int) -> None:
        """Read (and drop) the rest of a refused body, up to :data:`DRAIN_BYTES`, so the client reads our
        413 instead of a connection reset; past that the connection is closed on it."""
        while seen <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    def _message(self) -> str:
        return f"request body over {self.max_bytes} bytes; this API takes small JSON objects"

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
