"""Placement confirmations, grouped: one etcd read answers every placement waiting for one.

A placement of another node is committed by comparing what it chose on — the chosen node's
liveness key (same create revision: the same incarnation) and its ``reservations`` key (same
mod revision: nothing reserved or freed there since the view was read) — with what etcd holds
*after* the choice was made (:mod:`.node`, "Placement"). That comparison writes nothing, so it
needs no transaction of its own: any linearizable read that starts after the choice answers it.

:class:`Confirmations` therefore groups them, as a database groups commits. A placement that
asks while no etcd call of theirs is in flight sends one at once; placements that ask while
one is in flight wait for the next, which is sent as soon as it comes back, with all of them.
At most one call is in flight per node, whatever the load. A placement alone sends its
compare as a txn that writes nothing but reads its first key (etcd serves it as a linearizable
read — its leader confirms it still leads — with no raft entry and no fsync; with no operation
at all etcd would answer it from the member's own state, quorum or not: :class:`~.etcd.Get`;
1.7-1.9 ms interleaved with 3.2-3.3
for the compare and put placement used before, on a 3-member etcd here). Several send one
read of every node's two keys (keys and revisions only: one txn of two range requests, also a
linearizable read, 2.3-2.5 ms) and each checks its own compare against it — a txn's compares
are all or nothing, so they could not share one. Fifty clients at once share a few calls
instead of sending fifty — which on this repository's two-core machine was most of the
placer's CPU (the HTTP client's connection pool scans every open connection for every request:
fifty connections to etcd, fifty requests) and half of etcd's.

A call is joined only before it is sent, so it always starts after the choice of everyone it
answers: the guarantee of a compare in a txn, and nothing weaker. A call that fails fails
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
    """Checks of placements: one alone by a compare-only txn (``compare``), several waiting together by
    one shared linearizable read of every node's keys (``read``); one etcd call in flight at a time."""

    def __init__(self, read: Callable[[], Awaitable[Revisions]],
                 compare: Callable[[Sequence[Check]], Awaitable[bool]]):
        self._read = read
        self._compare = compare
        self._next: list[tuple[Sequence[Check], asyncio.Future[bool]]] = []  # waiting for the next call
        self._sending = False
        self._sender: asyncio.Future[None] | None = None
        self.reads = 0  # etcd calls sent (each answered every placement that joined it)

    async def confirm(self, checks: Sequence[Check]) -> bool:
        """True when every check holds at a point after this call began. Raises what the etcd call raised."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_retrieved)
        self._next.append((checks, answer))
        if not self._sending:
            self._sending = True
            self._sender = asyncio.ensure_future(self._send())
        return await asyncio.shield(answer)

    async def _send(self) -> None:
        try:
            while self._next:
                batch, self._next = self._next, []  # from here on, callers join the next call
                self.reads += 1
                try:
                    if len(batch) == 1:  # alone: the compare itself, the cheapest answer (no values sent back)
                        batch[0][1].set_result(await self._compare(batch[0][0]))
                        continue
                    found = await self._read()
                except Exception as exc:  # noqa: BLE001 - handed to every caller waiting for it
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                for checks, answer in batch:
                    if not answer.done():
                        answer.set_result(all(check.holds(found) for check in checks))
        finally:
            self._sending = False


def _retrieved(future: asyncio.Future[bool]) -> None:
    """Every caller may have gone (their requests cancelled): the exception is theirs, not the loop's."""
    if not future.cancelled():
        future.exception()


__all__ = ["Check", "Confirmations", "Revisions"]
