"""The event bus: what the runtime did, for the log, the loop's output, the API and the metrics.

``publish(kind, **data)`` appends the event to the store's event log (when the
bus has a store) and hands it to every live subscriber; ``announce`` only
hands it on (for the frequent and uneventful). ``kind`` is an
:class:`~reconciler.core.events.EventKind`: every kind is declared there,
once. Each event is a dict ``{"id", "ts", "kind", ...data}``; ``service`` and
``message`` have their own columns in the store, everything else goes to its
JSON data; ``ts`` comes from the injected clock. A subscriber is an async
iterator over its own bounded queue: a subscriber that falls behind loses its
oldest events (``dropped`` counts them), never blocks the runtime. Subscribe
and publish from the event loop's thread. Every string in an event passes
the bus's :class:`~reconciler.core.redaction.Redactor` first, so no event —
in the log, the stream, the output — carries a value read from the
environment (invariant 8).

**The store's own news.** An event that cannot be recorded (the store
fails) is still delivered: the store failing must not silence what is
happening, nor end the loop that publishes it. What the store has to say
about itself (:class:`~reconciler.store.base.StoreNotice`) is reported here,
at the next event: ``store.failed`` (shown only — the store cannot take it;
the store logs it as well), ``store.recovered`` and ``store.restored``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from reconciler.core.clock import Clock, iso_utc
from reconciler.core.events import EventKind
from reconciler.core.redaction import Redactor
from reconciler.errors import StoreError
from reconciler.store.base import Store

NOTICE_KINDS = {"failed": EventKind.STORE_FAILED, "recovered": EventKind.STORE_RECOVERED,
                "restored": EventKind.STORE_RESTORED}

DEFAULT_QUEUE_SIZE = 1000


class Subscription:
    """One subscriber's events, as an async iterator; ``close()`` (or ``async with``) ends it."""

    def __init__(self, bus: EventBus, maxsize: int):
        self._bus = bus
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize)
        self.dropped = 0
        self.closed = False

    def _deliver(self, event: dict[str, Any]) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.closed and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus._subscribers.discard(self)
            if not self._queue.full():  # wake a reader waiting on an empty queue; a full one drains first
                self._queue.put_nowait(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Publishes runtime events to the store's log and to subscribers."""

    def __init__(self, store: Store | None, *, clock: Clock, redactor: Redactor | None = None):
        self.store = store
        self.clock = clock
        self.redactor = redactor if redactor is not None else Redactor()
        self._subscribers: set[Subscription] = set()
        self._reporting = False

    def publish(self, kind: EventKind, **data: Any) -> dict[str, Any]:
        """Record and deliver one event; returns it (``id`` None when the store could not record it)."""
        return self._emit(kind, data, record=True)

    def announce(self, kind: EventKind, **data: Any) -> dict[str, Any]:
        """Deliver to subscribers without recording: for the frequent, uneventful (a pass with nothing to do)."""
        return self._emit(kind, data, record=False)

    def _emit(self, kind: EventKind, data: dict[str, Any], *, record: bool) -> dict[str, Any]:
        if not isinstance(kind, EventKind):
            raise TypeError(f"event kind {kind!r} is not declared in reconciler.core.events.EventKind")
        ts = self.clock.now()
        data = self.redactor.data(data)  # no event ever carries an expanded ${VAR} value (invariant 8)
        service = data.get("service")
        message = str(data.get("message", ""))
        extra = {k: v for k, v in data.items() if k not in ("service", "message")}
        event_id = None
        if record and self.store is not None:
            with contextlib.suppress(StoreError):  # the store's own notice says so (store.failed); it still goes out
                event_id = self.store.record_event(kind.value, service=service, message=message, data=extra, ts=ts)
        self._report_store()
        event = {"id": event_id, "ts": iso_utc(ts), "kind": kind, **data}
        for subscriber in list(self._subscribers):
            subscriber._deliver(event)
        return event

    def _report_store(self) -> None:
        """Publish what the store has to say about itself (failed, recovered, restored) since the last event."""
        if self.store is None or self._reporting:
            return
        self._reporting = True
        try:
            for notice in self.store.take_notices():
                self._emit(NOTICE_KINDS[notice.kind], {"message": notice.message, "path": notice.path},
                           record=notice.kind != "failed")
        finally:
            self._reporting = False

    def subscribe(self, maxsize: int = DEFAULT_QUEUE_SIZE) -> Subscription:
        """A new subscription; it sees every event published from now on."""
        subscription = Subscription(self, maxsize)
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """End every subscription (their iterators stop after the events already queued)."""
        for subscriber in list(self._subscribers):
            subscriber.close()
