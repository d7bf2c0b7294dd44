"""Admission to a service: ``max_concurrent`` requests in flight, the rest queued, first come first served.

Each service has one :class:`Gate`. A request holds a place in it from
before its implicit lease until its answer ends; at most ``slots`` (the
service's lease capacity: ``max_concurrent`` when ``shared``, else 1) hold
one at once, so the leasing service is never asked for more than an
instance can give, and a request never becomes one more demand for the
planner to plan while it only waits for a slot. Up to ``max_queued`` more
wait in order; past that the answer is 429 with ``Retry-After``
(:class:`QueueFull`).

**Models.** For a service whose launch holds ``{model}`` (one instance serves
one model at a time), the head of the queue asking for another model than
the requests in flight is not let in beside them, and nobody behind it
either: once those in flight end, the instance is idle, the head's lease
switches it (as the planner decides for an idle instance), and the requests
for that model behind it follow. So a switch is never starved by a stream of
requests for the loaded model, and requests for one model are served
together.

Everything runs in the event loop's thread; a waiter that gives up (its
time is up, its client went away) leaves the queue at once and lets the next
one in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from reconciler.errors import CallerGone


class QueueFull(Exception):
    """The service's queue is full: answered 429."""

    def __init__(self, queued: int):
        super().__init__(f"{queued} requests already wait")
        self.queued = queued


class GateTimeout(Exception):
    """No slot within the request's wait: answered 503."""


@dataclass(eq=False)
class _Waiter:
    model: str
    admitted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Gate:
    """One service's admission: ``slots`` in flight, ``max_queued`` waiting, FIFO (see the module docstring)."""

    def __init__(self, slots: int, max_queued: int, switches: bool):
        self.slots = slots
        self.max_queued = max_queued
        self.switches = switches  # one model per instance: {model} in its launch
        self.in_flight = 0
        self.serving: str | None = None  # the model of the requests in flight (when switches)
        self._queue: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def configure(self, slots: int, max_queued: int, switches: bool) -> None:
        """A saved edit of the profile changed the service."""
        self.slots, self.max_queued, self.switches = slots, max_queued, switches
        self._pump()

    def _fits(self, model: str) -> bool:
        return self.in_flight < self.slots and (not self.switches or self.in_flight == 0 or self.serving == model)

    def try_enter(self, model: str) -> bool:
        """Enter at once when nobody waits and there is room (the common, warm case)."""
        if self._queue or not self._fits(model):
            return False
        self._admit(model)
        return True

    async def enter(self, model: str, timeout_s: float, gone: asyncio.Event | None = None) -> None:
        """Wait for a place; raises :class:`QueueFull`, :class:`GateTimeout` or ``CallerGone``."""
        if self.try_enter(model):
            return
        if len(self._queue) >= self.max_queued:
            raise QueueFull(len(self._queue))
        waiter = _Waiter(model)
        self._queue.append(waiter)
        watching = asyncio.ensure_future(gone.wait()) if gone is not None else None
        waits: list[asyncio.Future[Any]] = [waiter.admitted, *([watching] if watching is not None else [])]
        try:
            await asyncio.wait(waits, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watching is not None:
                watching.cancel()
            if not waiter.admitted.done():
                waiter.admitted.cancel()
                self._queue.remove(waiter)
                self._pump()  # it may have held up those behind it (another model at the head)
        if waiter.admitted.cancelled():
            if gone is not None and gone.is_set():
                raise CallerGone("the client went away while it waited for a slot")
            raise GateTimeout()

    def _admit(self, model: str) -> None:
        self.in_flight += 1
        self.serving = model

    def leave(self) -> None:
        """A request that held a place has its answer (or gave up): let the next ones in."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self.serving = None
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._fits(self._queue[0].model):
            waiter = self._queue.popleft()
            if waiter.admitted.done():
                continue
            self._admit(waiter.model)
            waiter.admitted.set_result(None)


class Gates:
    """Every service's :class:`Gate`."""

    def __init__(self) -> None:
        self._gates: dict[str, Gate] = {}

    def of(self, service: str, slots: int, max_queued: int, switches: bool) -> Gate:
        gate = self._gates.get(service)
        if gate is None:
            gate = self._gates[service] = Gate(slots, max_queued, switches)
        elif (gate.slots, gate.max_queued, gate.switches) != (slots, max_queued, switches):
            gate.configure(slots, max_queued, switches)
        return gate


__all__ = ["Gate", "GateTimeout", "Gates", "QueueFull"]
