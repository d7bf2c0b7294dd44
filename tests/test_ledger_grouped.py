"""Grouped commits (issue 10): the lease writes made in one turn of the event loop share one transaction, and
each request is answered only once its own write is durable — or refused with the store's error, its change
undone in memory. Real SQLite; a second connection reads what is durable."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from reconciler.core.snapshot import Lease
from reconciler.errors import StoreError
from reconciler.runtime.ledger import Ledger
from reconciler.store import SqliteStore
from reconciler.testing.clock import T0, FakeClock


class CountingStore(SqliteStore):
    """A real store that counts its transactions and can be told to fail one lease's write, or a commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, FakeClock())
        self.batches = 0
        self.fail_lease: str | None = None
        self.fail_commit = False

    @contextmanager
    def batch(self, *, whole: bool = False) -> Iterator[None]:
        self.batches += 1
        with super().batch(whole=whole):
            yield
            if self.fail_commit:
                raise StoreError("disk full (a test's failing commit)")

    def put_lease(self, lease: Lease, *, demand_id: str | None = None, now: datetime | None = None) -> None:
        if lease.id == self.fail_lease:  # (as a real write that failed: its savepoint is rolled back)
            raise StoreError(f"cannot write lease {lease.id} (a test's failing write)")
        super().put_lease(lease, demand_id=demand_id, now=now)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    s = CountingStore(tmp_path / "state.db")
    try:
        yield s
    finally:
        s.close()


def durable_ids(store: SqliteStore) -> set[str]:
    """The lease ids another process would find: read through a connection of its own."""
    with sqlite3.connect(store.path) as other:
        return {row[0] for row in other.execute("SELECT id FROM leases")}


def vram(lease_id: str, mb: int = 10) -> Lease:
    return Lease(id=lease_id, kind="vram", service=f"app-{lease_id}", holder="h", gpu=0, mb=mb)


def test_a_turns_grants_share_one_transaction_and_are_durable_when_answered(store: CountingStore) -> None:
    ledger = Ledger(store, FakeClock())

    async def scenario() -> None:
        grants = [asyncio.ensure_future(ledger.grant_durably(vram(f"L{i}"), 99, now=T0)) for i in range(20)]
        await asyncio.sleep(0)  # every request has run up to its wait: granted in memory, none durable yet
        assert ledger.vram_mb() == {0: 200} and durable_ids(store) == set() and store.batches == 0
        assert await asyncio.gather(*grants) == [True] * 20
        assert store.batches == 1 and durable_ids(store) == {f"L{i}" for i in range(20)}
        releases = [asyncio.ensure_future(ledger.release_durably(f"L{i}", T0)) for i in range(10)]
        assert [lease.id for lease in await asyncio.gather(*releases) if lease] == [f"L{i}" for i in range(10)]
        assert store.batches == 2 and durable_ids(store) == {f"L{i}" for i in range(10, 20)}

    asyncio.run(scenario())
    assert {lease.id for lease in Ledger(store, FakeClock()).leases()} == {f"L{i}" for i in range(10, 20)}


def test_a_failed_write_refuses_its_whole_turn_and_undoes_it_newest_first(store: CountingStore) -> None:
    """All or nothing: a group that cannot be written is undone whole, so the memory a release freed and a grant
    of the same turn took again is held by the released lease again, and by nothing else."""
    ledger = Ledger(store, FakeClock())

    async def scenario() -> list[object]:
        assert await ledger.grant_durably(vram("old", mb=100), 99, now=T0)
        store.fail_lease = "bad"
        return await asyncio.gather(
            ledger.release_durably("old", T0), ledger.grant_durably(vram("new", mb=100), 99, now=T0),
            ledger.grant_durably(vram("bad"), 99, now=T0), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, StoreError) and "cannot write lease bad" in str(o) for o in outcomes)
    assert [lease.id for lease in ledger.leases()] == ["old"] and ledger.vram_mb() == {0: 100}
    assert durable_ids(store) == {"old"}


def test_grouped_changes_reach_the_store_in_the_order_memory_saw_them(store: CountingStore) -> None:
    """A write that does not wait for the turn (a pass's release) commits the turn's group first: a release
    made while its grant still waits to commit leaves no lease behind in the store."""
    ledger = Ledger(store, FakeClock())

    async def scenario() -> None:
        grant = asyncio.ensure_future(ledger.grant_durably(vram("G"), 99, now=T0))
        await asyncio.sleep(0)
        assert ledger.release("G", T0) is not None  # synchronous: the group commits first, then the release
        assert await grant is True

    asyncio.run(scenario())
    assert ledger.leases() == [] and durable_ids(store) == set()


def test_a_grant_over_the_limit_is_refused_before_it_waits(store: CountingStore) -> None:
    ledger = Ledger(store, FakeClock())

    async def scenario() -> list[bool]:
        lease = Lease(id="S", service="llm", holder="h", expires_at=T0 + timedelta(seconds=60))
        return list(await asyncio.gather(ledger.grant_durably(lease, 1, now=T0),
                                         ledger.grant_durably(Lease(id="S2", service="llm"), 1, now=T0)))

    assert asyncio.run(scenario()) == [True, False]
    assert durable_ids(store) == {"S"}
