"""Placement confirmations, grouped: one etcd read answers every placement waiting for one.

A placement of another node is committed by comparing what it chose on — the chosen node's
liveness key (same create revision: the same incarnation) and its ``reservations`` key (same
mod revision: nothing reserved or freed there since the view was read) — with what etcd holds
*after* the choice was made (:mod:`.node`, "Placement"). That comparison writes nothing, so it
needs no transaction of its own: any linearizable read that starts after the choice answers it.

:class:`Confirmations` therefore groups them, as a database groups commits. The first placement
that asks sends one read of every node's two keys (keys and revisions only, no values: one
txn of two range requests, which etcd serves as a linearizable read — its leader confirms it
still leads — with no raft entry and no fsync); placements that ask while that read is in
flight wait for the next one, which is sent as soon as the first comes back, with all of them.
At most one read is in flight per node, whatever the load. One client alone waits no longer
than before (its read goes at once); fifty at once share two or three reads instead of sending
fifty — which on this repository's two-core machine was most of the placer's CPU (the HTTP
client's connection pool scans every open connection for every request: fifty connections to
etcd, fifty requests) and a third of etcd's.

A read joined only before it is sent, so it always starts after the choice of everyone it
answers: the guarantee of a compare in a txn, and nothing weaker. A read that fails fails
every placement waiting for it (the caller maps :class:`~.etcd.EtcdError` to 503, as before).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Revisions = dict[str, tuple[int, int]]  # key → (create revision, mod revision), as etcd holds them now


@dataclass(frozen=True)
class Check:
    """``key``'s ``target`` revision is still ``revision`` (a key that is gone fails)."""

    key: str
    target: Literal["CREATE", "MOD"]
    revision: int

    def holds(self, found: Revisions) -> bool:
        now = found.get(self.key)
        return now is not None and now[0 if self.target == "CREATE" else 1] == self.revision


class Confirmations:
    """Checks of placements, answered by one shared linearizable read at a time (``read``)."""

    def __init__(self, read: Callable[[], Awaitable[Revisions]]):
        self._read = read
        self._next: asyncio.Future[Revisions] | None = None  # the read not sent yet, that callers join
        self._sending = False
        self._sender: asyncio.Future[None] | None = None
        self.reads = 0  # reads sent (each answered every placement that joined it)

    async def confirm(self, checks: Sequence[Check]) -> bool:
        """True when every check holds at a point after this call began. Raises what the read raised."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_retrieved)
            if not self._sending:
                self._sending = True
                self._sender = asyncio.ensure_future(self._send())
        found = await asyncio.shield(self._next)
        return all(check.holds(found) for check in checks)

    async def _send(self) -> None:
        try:
            while self._next is not None:
                batch, self._next = self._next, None  # from here on, callers join the next read
                self.reads += 1
                try:
                    batch.set_result(await self._read())
                except Exception as exc:  # noqa: BLE001 - handed to every caller waiting for it
                    batch.set_exception(exc)
        finally:
            self._sending = False


def _retrieved(future: asyncio.Future[Revisions]) -> None:
    """Every caller may have gone (their requests cancelled): the exception is theirs, not the loop's."""
    if not future.cancelled():
        future.exception()


__all__ = ["Check", "Confirmations", "Revisions"]
