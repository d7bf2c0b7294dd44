"""Connections to the model servers: one httpx pool per instance, kept alive between requests.

Every request to an instance goes through its :class:`httpx.AsyncClient`, so
consecutive requests reuse its connections (no TCP handshake, no new
socket per request). A pool belongs to one instance: when the process that
answers on a service's port is another one (a restart, a model switch, an
eviction and a start), the old pool is closed and a new one made
(:meth:`Pools.client` with the instance's pid, which the gateway reads when a
request had to wait for a pass — only a pass starts or restarts an
instance). A connection the server closed meanwhile is noticed by httpx
before it is reused.

Few idle connections: httpcore looks at every connection of a pool for each
request it places and each answer it ends (a ``poll`` of every idle socket,
and a scan of waiting requests against connections), so the cost of a
request grows with the pool. At 50 concurrent clients on this two-core
machine a pool keeping 64 idle connections served 176 requests a second, 16
kept 237, 8 kept 305, 4 kept 313 (the gateway
benchmark's warm round); on loopback a new connection costs less than
scanning many, so :data:`KEEPALIVE` is 8.

Timeouts: connecting :data:`CONNECT_S` (the instance is healthy when its
lease is granted, so a refused connection is a failure, answered 502), and
a read may wait :data:`READ_S` between two pieces of the answer (a long
prompt's first token). Responses are asked for uncompressed, so the bytes
relayed are the bytes the client reads.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

CONNECT_S = 10.0
READ_S = 600.0
WRITE_S = 60.0
KEEPALIVE = 8  # idle connections kept per instance (see the module text: more costs more)
KEEPALIVE_EXPIRY_S = 30.0


@dataclass
class _Pool:
    client: httpx.AsyncClient
    pid: int | None


class Pools:
    """Service → the pool of its current instance."""

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def client(self, service: str, url: str, pid: int | None = None) -> httpx.AsyncClient:
        """The pool for ``service`` at ``url``; a new one when ``pid`` (when known) or ``url`` changed."""
        pool = self._pools.get(service)
        if pool is not None and str(pool.client.base_url).rstrip("/") == url and (pid is None or pid == pool.pid):
            return pool.client
        if pool is not None:
            self._retire(pool.client)
        client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(connect=CONNECT_S, read=READ_S, write=WRITE_S, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
            headers={"accept-encoding": "identity"},
            trust_env=False,  # loopback: no proxy from the environment, ever
        )
        self._pools[service] = _Pool(client, pid)
        return client

    def _retire(self, client: httpx.AsyncClient) -> None:
        task = asyncio.ensure_future(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for pool in self._pools.values():
            self._retire(pool.client)
        self._pools.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)


__all__ = ["CONNECT_S", "READ_S", "Pools"]
