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
from tests.runtime_support import env  # noqa: F401 (fixture)


class CountingStore(SqliteStore):
    """A real store that counts its transactions and can be told to fail a lease's write, or a commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, FakeClock())
        self.batches = 0
        self.fail: dict[str, BaseException] = {}  # lease id → what writing it raises
        self.fail_commit = False

    @contextmanager
    def batch(self, *, whole: bool = False) -> Iterator[None]:
        self.batches += 1
        with super().batch(whole=whole):
            yield
            if self.fail_commit:
                raise StoreError("disk full (a test's failing commit)")

    def put_lease(self, lease: Lease, *, demand_id: str | None = None, now: datetime | None = None) -> None:
        if lease.id in self.fail:  # (as a real write that failed: nothing of it is written)
            raise self.fail[lease.id]
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
        store.fail["bad"] = StoreError("cannot write lease bad (a test's failing write)")
        return await asyncio.gather(
            ledger.release_durably("old", T0), ledger.grant_durably(vram("new", mb=100), 99, now=T0),
            ledger.grant_durably(vram("bad"), 99, now=T0), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, StoreError) and "cannot write lease bad" in str(o) for o in outcomes)
    assert [lease.id for lease in ledger.leases()] == ["old"] and ledger.vram_mb() == {0: 100}
    assert durable_ids(store) == {"old"}


def test_a_failed_commit_refuses_every_request_of_the_turn_and_changes_nothing(store: CountingStore) -> None:
    ledger = Ledger(store, FakeClock())

    async def scenario() -> None:
        assert await ledger.grant_durably(vram("kept"), 99, now=T0)
        store.fail_commit = True
        outcomes = await asyncio.gather(
            ledger.grant_durably(vram("A"), 99, now=T0), ledger.release_durably("kept", T0),
            ledger.grant_durably(Lease(id="S", service="llm", holder="h"), 1, now=T0), return_exceptions=True)
        assert all(isinstance(o, StoreError) and "disk full" in str(o) for o in outcomes)

    asyncio.run(scenario())
    assert [lease.id for lease in ledger.leases()] == ["kept"] and ledger.vram_mb() == {0: 10}
    assert ledger.held("llm", "service", T0) == 0 and durable_ids(store) == {"kept"}


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


# --- found by an adversarial review of the grouped commits -------------------------------------------------


def test_a_write_that_raises_something_else_than_a_store_error_answers_and_undoes_its_group(
        store: CountingStore) -> None:
    """A bug in a write (or an sqlite3 error not wrapped) must not leave the group's requests waiting forever, nor
    memory holding leases the store never got."""
    ledger = Ledger(store, FakeClock())
    store.fail["bad"] = RuntimeError("a bug in a write")
    loop_errors: list[object] = []

    async def scenario() -> list[object]:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        grants = [ledger.grant_durably(vram("good", mb=100), 99, now=T0), ledger.grant_durably(vram("bad"), 99, now=T0)]
        return await asyncio.wait_for(asyncio.gather(*grants, return_exceptions=True), timeout=2)

    outcomes = asyncio.run(scenario())  # before the fix: TimeoutError — both requests wait forever
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    assert ledger.leases() == [] and ledger.vram_mb() == {0: 0}
    assert durable_ids(store) == set()


def test_a_failed_group_does_not_fail_a_memory_only_release_of_the_same_turn(store: CountingStore) -> None:
    """The gateway's memory-only lease is released synchronously; a failing group of the same turn (a cf-orch
    VRAM lease) must not make that release raise the group's error and leave the lease held."""
    ledger = Ledger(store, FakeClock())
    store.fail["bad"] = StoreError("disk full")

    async def scenario() -> object:
        gw = Lease(id="gw", service="llm", holder="gateway", expires_at=T0 + timedelta(seconds=120))
        assert ledger.grant(gw, 4, now=T0, durable=False)
        grant = asyncio.ensure_future(ledger.grant_durably(vram("bad"), 99, now=T0))
        await asyncio.sleep(0)  # the cf-orch request waits for its group
        try:
            ledger.release("gw", T0)  # the gateway's request ends in the same turn
        except StoreError as exc:
            released: object = exc
        else:
            released = None
        with pytest.raises(StoreError):
            await grant
        return released

    released = asyncio.run(scenario())
    assert released is None, f"the memory-only release raised the group's error: {released!r}"
    assert ledger.get("gw") is None  # before the fix: still held, until its TTL (120 s for the gateway)


def test_a_cancelled_grant_leaves_no_lease_behind(store: CountingStore) -> None:
    """A request cancelled while waiting for its group (the server stops) never learns its lease's id: before the
    fix the lease was still written, and one without a TTL (a cf-orch VRAM lease, ttl_s 0) was held for ever by
    nobody — its memory booked across restarts. The queued path's _forget releases in the same case."""
    ledger = Ledger(store, FakeClock())

    async def scenario() -> None:
        grant = asyncio.ensure_future(ledger.grant_durably(Lease(id="S", service="llm", holder="h"), 1, now=T0))
        await asyncio.sleep(0)
        grant.cancel()
        await asyncio.gather(grant, return_exceptions=True)
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert ledger.get("S") is None and durable_ids(store) == set()


class FailingRelease(CountingStore):
    failing_release: str | None = None

    def release_lease(self, lease_id: str) -> bool:
        if lease_id == self.failing_release:
            raise StoreError(f"cannot release {lease_id} (a test's failing write)")
        return super().release_lease(lease_id)


def test_an_expiry_that_fails_keeps_the_busy_time_still_to_write(tmp_path: Path) -> None:
    """A grant's "busy" (idle_since cleared) waits to be written; an expiry of a pass that fails must not drop it, or
    the store says idle since the previous release while the service holds a lease (found by a fuzzer:
    scratch/fuzz_ledger.py)."""
    from reconciler.core.snapshot import Instance

    store = FailingRelease(tmp_path / "state.db")
    try:
        idle_before = T0 - timedelta(hours=1)
        store.put_instance(Instance(service="llm", origin="adopted", idle_since=idle_before))
        ledger = Ledger(store, FakeClock())
        lease = Lease(id="S", service="llm", holder="h", expires_at=T0 + timedelta(seconds=1))

        async def scenario() -> None:
            assert await ledger.grant_durably(lease, 1, now=T0)  # durable; "busy" written behind
            store.failing_release = "S"
            with pytest.raises(StoreError):
                ledger.expire(T0 + timedelta(seconds=5))  # the pass's expiry fails: nothing expired
            store.failing_release = None
            ledger.flush()  # the next pass flushes first

        asyncio.run(scenario())
        instance = store.get_instance("llm")
        assert ledger.get("S") is not None
        assert instance is not None and instance.idle_since is None, instance.idle_since  # before the fix: idle_before
    finally:
        store.close()


def test_a_memory_only_lease_released_through_the_route_is_announced_not_recorded(env) -> None:
    """``DELETE /v1/leases/{id}`` now goes through ``Leasing.release_durably``: a gateway's memory-only lease released
    there was recorded in the event log (publish) where ``Leasing.release`` only announces it."""
    from reconciler.runtime.leasing import Leasing
    from tests.runtime_support import fake_service, make_profile

    profile = make_profile({"svc": fake_service(None, max_mb=100)})

    async def main() -> list[tuple[str, bool]]:
        async with env.runtime() as rt:
            leasing = Leasing(rt, lambda: profile)
            seen: list[tuple[str, bool]] = []
            publish, announce = rt.events.publish, rt.events.announce
            rt.events.publish = lambda kind, **data: (seen.append((str(kind), True)), publish(kind, **data))[1]
            rt.events.announce = lambda kind, **data: (seen.append((str(kind), False)), announce(kind, **data))[1]
            lease = Lease(id="gw", service="svc", holder="gateway", expires_at=rt.clock.now() + timedelta(seconds=120))
            assert rt.ledger.grant(lease, 4, now=rt.clock.now(), durable=False)
            assert await leasing.release_durably("gw") is not None
            return seen

    seen = asyncio.run(main())
    assert [recorded for kind, recorded in seen if "released" in kind] == [False], seen
