"""Implicit leases: every gateway request holds one, from routing until its answer ends.

This is the one place where the gateway talks to the runtime's leasing
service (:class:`reconciler.runtime.leasing.Leasing`), so that a change of
its interface (a release that becomes a coroutine, say) is a change here:

* :meth:`ImplicitLeases.acquire` asks for a lease on the request's service
  and model — the warm path when a compatible instance has a free slot,
  else a demand that the next pass plans (a start, a model switch of an idle
  instance, evictions of less important idle services) and grants, waiting
  at most the request's remaining wait; a client that goes away meanwhile
  has its demand withdrawn. The holder names the client
  (``gateway 127.0.0.1:53422``).
* :meth:`ImplicitLeases.release` ends it as soon as the answer has been
  sent, the upstream failed, or the client went away.
* A warm grant is held in memory only (``durable=False``, see
  :mod:`reconciler.runtime.ledger`): its holder is a connection of this
  process and cannot outlive it, so it costs no store transaction — the two
  it cost (grant, release) were a third of the gateway's CPU per warm
  request — and a reconciler that restarts finds it gone. A lease granted
  after a wait (a pass planned it) is written like any other.
* A lease has a time to live (:data:`LEASE_TTL_S`) so that a written one
  outlives a gateway that dies by that at most; one task renews the leases
  of long answers (a stream of minutes) every :data:`RENEW_EVERY_S`.
* :meth:`ImplicitLeases.keep_alive` records an Ollama request's
  ``keep_alive`` for the instance that served it (see
  :mod:`reconciler.runtime.keepalive`) and asks for a pass when it says to
  stop at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from reconciler.core.clock import Clock
from reconciler.errors import ReconcilerError
from reconciler.runtime import Runtime
from reconciler.runtime.leasing import Granted, LeaseRequest, Leasing

LEASE_TTL_S = 120.0  # an implicit lease outlives a gateway that died by at most this
RENEW_EVERY_S = 30.0  # how often leases held longer than half their TTL are renewed
HOLDER = "gateway"

log = logging.getLogger("reconciler.gateway")


def holder(client: str) -> str:
    """The lease holder of a request from ``client`` (``host:port``): ``gateway 127.0.0.1:53422``."""
    return f"{HOLDER} {client or 'unknown client'}"


class ImplicitLeases:
    """The gateway's leases through one :class:`Leasing`; :meth:`start` in the event loop, :meth:`close` at the end."""

    def __init__(self, runtime: Runtime, leasing: Leasing):
        self.runtime = runtime
        self.leasing = leasing
        self.clock: Clock = runtime.clock
        self._held: dict[str, float] = {}  # lease id → when it was granted or last renewed (monotonic)
        self._renewing: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._renewing = asyncio.ensure_future(self._renew())

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        for lease_id in list(self._held):
            await self.release(lease_id)

    @property
    def held(self) -> int:
        return len(self._held)

    async def acquire(self, service: str, model: str | None, client: str, wait_s: float,
                      disconnected: Callable[[], Awaitable[object]]) -> Granted:
        """A lease on ``service`` for ``model`` (None: whatever it serves); raises LeaseRefused or CallerGone as the
        leasing service does."""
        granted = await self.leasing.lease(
            LeaseRequest(service=service, holder=holder(client), model=model, ttl_s=LEASE_TTL_S,
                         wait_s=max(0.0, wait_s), durable=False),
            disconnected=disconnected)
        self._held[granted.lease.id] = self.clock.monotonic()
        return granted

    async def release(self, lease_id: str) -> None:
        """End the lease now (nothing when it ended already: expired, or released by an eviction)."""
        self._held.pop(lease_id, None)
        self.leasing.release(lease_id)

    def keep_alive(self, service: str, seconds: float | None) -> None:
        """Ollama's ``keep_alive`` for the instance of ``service`` (None: the service's own idle stop)."""
        instance = self.runtime.store.get_instance(service)
        if instance is None or instance.origin != "started":
            return  # nothing of ours to keep or stop
        if seconds is None and self.runtime.keep_alive.get(service) is None:
            return
        self.runtime.keep_alive.set(service, seconds, instance.pid)
        if seconds is not None and seconds >= 0:
            self.runtime.wake()  # a pass soon: the first that may stop it (now, for 0)

    async def _renew(self) -> None:
        while True:
            await self.clock.sleep(RENEW_EVERY_S)
            now = self.clock.monotonic()
            for lease_id, since in list(self._held.items()):
                if now - since < LEASE_TTL_S / 2 or lease_id not in self._held:
                    continue
                try:
                    renewed = self.leasing.renew(lease_id, LEASE_TTL_S)
                except ReconcilerError as exc:  # the store failing now: the next round tries again
                    log.warning("renewing gateway lease %s failed (%s); retrying in %g s", lease_id, exc,
                                RENEW_EVERY_S)
                    continue
                if renewed is not None:
                    self._held[lease_id] = now
                else:
                    self._held.pop(lease_id, None)  # ended (an eviction released it)


__all__ = ["HOLDER", "LEASE_TTL_S", "ImplicitLeases", "holder"]
