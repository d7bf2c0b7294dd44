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

**Recorded in batches.** The bus numbers events itself (going on from the
store's newest id) and hands each to its subscribers at once, numbered; the
store records them in one transaction per batch. The lease traffic's own
events (:data:`BATCHED_KINDS`: granted, released, renewed, demands added and
withdrawn — two per lease request) wait up to :data:`FLUSH_AFTER_S` to be
recorded with the others of their burst; any other event records everything
waiting, itself included, at once, and so do :meth:`EventBus.flush` (a reader
of the log calls it first) and :meth:`EventBus.close`. Outside an event loop
(``apply``) every event is recorded at once. What this costs: a ``kill -9``
can take the log's record of the last 50 ms of lease events with it — never
a lease, which the ledger made durable before it was answered. Events the
store could not record are kept (at most :data:`MAX_UNRECORDED`) and recorded
with the next batch that it takes.

**The store's own news.** An event that cannot be recorded (the store
fails) is still delivered: the store failing must not silence what is
happening, nor end the loop that publishes it. What the store has to say
about itself (:class:`~reconciler.store.base.StoreNotice`) is reported here,
at the next event: ``store.failed`` (shown only — the store cannot take it;
the store logs it as well), ``store.recovered`` and ``store.restored``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from reconciler.core.clock import Clock, iso_utc
from reconciler.core.events import EventKind
from reconciler.core.redaction import Redactor
from reconciler.errors import StoreError
from reconciler.store.base import Event, Store

NOTICE_KINDS = {"failed": EventKind.STORE_FAILED, "recovered": EventKind.STORE_RECOVERED,
                "restored": EventKind.STORE_RESTORED}

DEFAULT_QUEUE_SIZE = 1000
FLUSH_AFTER_S = 0.05  # the longest a lease event waits to be recorded
MAX_UNRECORDED = 10_000  # events kept for the store while it fails (the oldest go first)
BATCHED_KINDS = frozenset({EventKind.LEASE_GRANTED, EventKind.LEASE_RELEASED, EventKind.LEASE_RENEWED,
                           EventKind.DEMAND_ADDED, EventKind.DEMAND_WITHDRAWN})


class Subscription:
    """One subscriber's events, as an async iterator; ``close()`` (or ``async with``) ends it."""

    def __init__(self, bus: EventBus, maxsize: int, wants: Callable[[dict[str, Any]], bool] | None = None):
        self._bus = bus
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize)
        self._wants = wants
        self.dropped = 0
        self.closed = False

    def _deliver(self, event: dict[str, Any]) -> None:
        if self._wants is not None and not self._wants(event):
            return
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
        self._last_id: int | None = None  # the newest id given (read from the store at the first event)
        self._unrecorded: list[Event] = []
        self._flushing: asyncio.TimerHandle | None = None

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
            event_id = self._number()
            if event_id is not None:
                self._unrecorded.append(Event(event_id, ts, kind.value, service, message, extra))
                del self._unrecorded[:-MAX_UNRECORDED]
                if kind not in BATCHED_KINDS or not self._later():
                    self.flush()
        self._report_store()
        event = {"id": event_id, "ts": iso_utc(ts), "kind": kind, **data}
        for subscriber in list(self._subscribers):
            subscriber._deliver(event)
        return event

    def _number(self) -> int | None:
        """The next event id (None when the store cannot say where the log ends: the event is not recorded)."""
        if self._last_id is None:
            assert self.store is not None
            try:
                self._last_id = self.store.last_event_id()
            except StoreError:  # the store's own notice says so (store.failed); the event still goes out
                return None
        self._last_id += 1
        return self._last_id

    def _later(self) -> bool:
        """Record what waits within :data:`FLUSH_AFTER_S` (False outside an event loop: record now)."""
        if self._flushing is not None:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._flushing = loop.call_later(FLUSH_AFTER_S, self.flush)
        return True

    def flush(self) -> None:
        """Record every event that waits, in one transaction (kept for the next try when the store fails)."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        if not self._unrecorded or self.store is None:
            return
        batch, self._unrecorded = self._unrecorded, []
        try:
            self.store.record_events(batch)
        except StoreError:  # the store's own notice says so (store.failed); kept for the next batch
            self._unrecorded = [*batch, *self._unrecorded][-MAX_UNRECORDED:]
            self._report_store()

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

    def subscribe(self, maxsize: int = DEFAULT_QUEUE_SIZE, *,
                  wants: Callable[[dict[str, Any]], bool] | None = None) -> Subscription:
        """A new subscription; it sees every event published from now on (those ``wants`` says yes to, when
        given: a subscriber that would skip most of a kind skips it before it is queued)."""
        subscription = Subscription(self, maxsize, wants)
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """Record what waits; end every subscription (their iterators stop after the events already queued)."""
        self.flush()
        for subscriber in list(self._subscribers):
            subscriber.close()
