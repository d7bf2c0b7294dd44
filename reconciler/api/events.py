"""``GET /v1/events``: the runtime's event bus as server-sent events.

Each event is one SSE message: ``id: <n>`` when the event is in the store's
log (shown-only events such as ``pass.started`` have none), ``event: <kind>``
and one ``data:`` line holding the event as a JSON object (``kind``
included). ``?since=N`` (or the ``Last-Event-ID`` header a reconnecting
browser sends) first replays the stored events after id N, then goes on
live without gaps or repeats (the subscription is taken before the replay).
Event ids are SQLite integers, so ``since`` is 0 to :data:`MAX_EVENT_ID`
(2^63 − 1): a query parameter past it is a 422 saying so. A
``Last-Event-ID`` header that is not such a number (too large, not ASCII
digits) is ignored, as if absent: the stream starts live with no replay,
since this server never sent that id and a browser resends whatever it was
given (a proxy's or another server's).
A comment (``: keep-alive``) every :data:`KEEPALIVE_S` keeps proxies from
closing an idle stream. The stream ends when the server stops.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from reconciler.core.clock import iso_utc
from reconciler.runtime import EventBus
from reconciler.store.base import Event, Store

KEEPALIVE_S = 15.0
REPLAY_LIMIT = 1000
MAX_EVENT_ID = 2**63 - 1  # SQLite's largest integer: the store's ids, and what it can compare with
_DIGITS = re.compile(r"[0-9]{1,19}")


def last_event_id(header: str | None) -> int | None:
    """The id in a ``Last-Event-ID`` header; None (no replay) when it is not one this server could have sent."""
    if header is None or not _DIGITS.fullmatch(header.strip()):
        return None
    value = int(header.strip())
    return value if value <= MAX_EVENT_ID else None


def sse(event: dict[str, Any]) -> str:
    """One SSE message; JSON keeps the data on one line."""
    lines = []
    if event.get("id") is not None:
        lines.append(f"id: {event['id']}")
    kind = str(event.get("kind", "message")).replace("\n", " ").replace("\r", " ")
    lines.append(f"event: {kind}")
    lines.append("data: " + json.dumps(event, default=str, ensure_ascii=False))
    return "\n".join(lines) + "\n\n"


def stored(event: Event) -> dict[str, Any]:
    """A logged event in the bus's shape: ``{"id", "ts", "kind", ...data}``."""
    out: dict[str, Any] = {"id": event.id, "ts": iso_utc(event.ts), "kind": event.kind}
    if event.service is not None:
        out["service"] = event.service
    if event.message:
        out["message"] = event.message
    out.update(event.data)
    return out


async def stream(
    bus: EventBus, store: Store, since: int | None, closing: asyncio.Event, keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[str]:
    subscription = bus.subscribe()
    last = since or 0
    getting: asyncio.Future[dict[str, Any]] | None = None
    stop = asyncio.ensure_future(closing.wait())
    try:
        yield ": connected\n\n"
        if since is not None:
            bus.flush()  # lease events wait a moment to be recorded in a batch: the replay must see them
            for record in store.events(since_id=since, limit=REPLAY_LIMIT):
                last = record.id
                yield sse(stored(record))
        while not closing.is_set():
            if getting is None:
                getting = asyncio.ensure_future(subscription.__anext__())
            waiting: set[asyncio.Future[Any]] = {getting, stop}
            done, _ = await asyncio.wait(waiting, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED)
            if getting in done:
                try:
                    event = getting.result()
                except StopAsyncIteration:
                    return
                getting = None
                if event.get("id") is not None and event["id"] <= last:
                    continue  # already replayed
                yield sse(event)
            elif stop in done:
                return
            else:
                yield ": keep-alive\n\n"
    finally:
        stop.cancel()
        if getting is not None:
            getting.cancel()
        subscription.close()
