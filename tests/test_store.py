"""SqliteStore on real files: persistence, intents, leases, backoff, events, errors."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timedelta

import pytest

from reconciler.core.backoff import BackoffPolicy, after_failure, after_healthy
from reconciler.core.launch import launch_digest as spec_hash
from reconciler.core.snapshot import Demand, Instance, Launch, Lease
from reconciler.errors import StoreError
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.runtime.ledger import IDLE_FLUSH_S, Ledger
from reconciler.store import SqliteStore, Store, default_state_dir, open_store
from reconciler.store.schema import SCHEMA_VERSION
from reconciler.testing.clock import T0, FakeClock


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


POLICY = BackoffPolicy(base_s=5, reset_after_s=60)


def record_failure(store, service, error, digest, now, policy=POLICY):
    return store.update_backoff(service, lambda old: after_failure(old, error, digest, now, policy))


def record_healthy(store, service, digest, now, policy):
    return store.update_backoff(service, lambda old: after_healthy(old, digest, now, policy))


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path, SYSTEM_CLOCK) as s:
        yield s


def vllm_instance(**kw) -> Instance:
    data = {
        "service": "vllm", "gpu": 0, "origin": "started", "pid": 5151, "create_time": 1763800100.25,
        "model": "qwen 2.5; x",
        "launch": Launch(argv=["/opt/vllm", "--model", "qwen 2.5; x"], cwd="", env={"A": "1"}, port=8000),
        "state": "running", "since": T0,
    }
    data.update(kw)
    return Instance(**data)


def test_created_on_first_open_with_wal_and_version(tmp_path):
    with open_store(tmp_path / "deep" / "dir", SYSTEM_CLOCK) as s:
        assert s.path == tmp_path / "deep" / "dir" / "state.db"
        assert s.path.is_file()
        assert s.schema_version == SCHEMA_VERSION
        assert isinstance(s, Store)
    conn = sqlite3.connect(tmp_path / "deep" / "dir" / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_default_state_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("RECONCILER_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "reconciler"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "reconciler"
    monkeypatch.setenv("RECONCILER_STATE_DIR", str(tmp_path / "explicit"))
    assert default_state_dir() == tmp_path / "explicit"


def test_everything_survives_reopen(tmp_path):
    lease = Lease(id="L1", service="vllm", holder="kiwi", gpu=0, mb=6500, model="qwen", expires_at=at(300))
    demand = Demand(id="D1", service="comfyui", holder="batch", requested_at=at(-60))
    digest = spec_hash(vllm_instance().launch)
    with open_store(tmp_path, SYSTEM_CLOCK) as s:
        s.put_instance(vllm_instance())
        s.put_instance(Instance(service="ollama", origin="adopted", pid=4242, create_time=1763800000.0))
        assert s.grant_lease(lease, max_concurrent=1, now=T0)
        s.add_demand(demand)
        record_failure(s, "comfyui", "exited with 1", "abc", at(0))
        s.record_event("start", "vllm", "started vllm", {"pid": 5151}, ts=at(1))
        intent = s.begin_intent("start:vllm", "start", "vllm", {"spec_hash": digest})
    with open_store(tmp_path, SYSTEM_CLOCK) as s:
        assert s.instances() == [
            Instance(service="ollama", origin="adopted", pid=4242, create_time=1763800000.0),
            vllm_instance(idle_since=None),
        ]
        assert s.get_instance("vllm").launch.argv == ["/opt/vllm", "--model", "qwen 2.5; x"]
        assert s.leases() == [lease]
        assert s.demands() == [demand]
        state = s.state()
        assert (state.leases, state.demands, len(state.instances)) == ([lease], [demand], 2)
        b = s.get_backoff("comfyui")
        assert (b.failures, b.last_error, b.next_attempt_at) == (1, "exited with 1", at(5))
        [event] = s.events()
        assert (event.kind, event.service, event.message, event.data, event.ts) == (
            "start", "vllm", "started vllm", {"pid": 5151}, at(1))
        [open_intent] = s.open_intents()
        assert open_intent.id == intent and open_intent.data == {"spec_hash": digest}


def test_crash_recovery_round_trip_with_intents(tmp_path):
    """A start written down, the process spawned, then a crash: the next run finds the pid."""
    s = open_store(tmp_path, SYSTEM_CLOCK)
    iid = s.begin_intent("start:vllm", "start", "vllm", {"gpu": 0, "model": "qwen"})
    s.update_intent(iid, {"pid": 5151, "create_time": 1763800100.25})
    done = s.begin_intent("stop:comfyui", "stop", "comfyui")
    s.finish_intent(done, "ok", {"signals": ["SIGTERM"]})
    s.close()  # the "crash": nothing else was written

    with open_store(tmp_path, SYSTEM_CLOCK) as s:
        [intent] = s.open_intents()
        assert (intent.id, intent.action_id, intent.kind, intent.service) == (iid, "start:vllm", "start", "vllm")
        assert intent.data == {"gpu": 0, "model": "qwen", "pid": 5151, "create_time": 1763800100.25}
        assert intent.outcome is None and intent.started_at.tzinfo is not None
        finished = s.finish_intent(iid, "recovered", {"adopted_as": "started"})
        assert finished.outcome == "recovered" and finished.finished_at is not None
        assert s.open_intents() == []
        assert s.get_intent(done).data == {"signals": ["SIGTERM"]}
        with pytest.raises(StoreError, match="already finished"):
            s.finish_intent(iid, "again")
        with pytest.raises(StoreError, match="no intent 999"):
            s.update_intent(999, {})


def test_instance_replace_and_remove(store):
    store.put_instance(vllm_instance())
    store.put_instance(vllm_instance(state="stopping", pid=6000))
    assert [i.pid for i in store.instances()] == [6000]
    assert store.remove_instance("vllm").state == "stopping"
    assert store.remove_instance("vllm") is None
    assert store.get_instance("vllm") is None


def test_grant_refuses_past_max_concurrent_and_consumes_demand(store):
    store.add_demand(Demand(id="D1", service="vllm"))
    store.add_demand(Demand(id="D2", service="vllm"))
    assert store.grant_lease(Lease(id="D1", service="vllm"), 2, demand_id="D1", now=T0)
    assert store.grant_lease(Lease(id="D1", service="vllm"), 2, now=T0)  # replay: no-op
    assert store.grant_lease(Lease(id="L2", service="vllm", expires_at=at(10)), 2, now=T0)
    assert not store.grant_lease(Lease(id="D2", service="vllm"), 2, demand_id="D2", now=T0)
    assert [lease.id for lease in store.leases("vllm")] == ["D1", "L2"]
    assert [d.id for d in store.demands()] == ["D2"]  # a refused grant leaves the demand queued
    # an expired lease does not hold a slot, even before expire_leases() removes it
    assert store.grant_lease(Lease(id="D2", service="vllm"), 2, demand_id="D2", now=at(10))
    assert store.demands() == []
    with pytest.raises(ValueError):
        store.grant_lease(Lease(id="X", service="vllm"), 0)


def test_vram_leases_do_not_take_service_slots(store):
    ledger = Ledger(store, FakeClock())
    store.put_instance(vllm_instance(idle_since=at(-5)))
    assert ledger.grant(Lease(id="V1", kind="vram", service="vllm", gpu=0, mb=512), 1, now=T0)
    assert store.get_instance("vllm").idle_since == at(-5)  # a bare VRAM lease does not make it busy
    assert ledger.grant(Lease(id="S1", service="vllm"), 1, now=T0)
    assert not ledger.grant(Lease(id="S2", service="vllm"), 1, now=T0)
    assert ledger.release("S1", now=at(1)) is not None
    assert store.get_instance("vllm").idle_since == at(1)
    assert store.leases()[0].kind == "vram"


def test_idle_since_is_written_in_place_and_reads_back_exactly(store):
    """set_idle_since edits the stored JSON in place (no parse and dump of the instance): what reads back is the
    instance with that one field changed, to the microsecond, with or without a fraction, and None."""
    store.put_instance(vllm_instance(idle_since=None))
    before = store.get_instance("vllm")
    for when in (at(1.5), at(2), T0.replace(microsecond=7), None, at(3)):
        store.set_idle_since("vllm", when)
        assert store.get_instance("vllm") == before.model_copy(update={"idle_since": when})
    store.set_idle_since("nobody", at(4))  # no instance: no change, no error
    assert store.get_instance("nobody") is None


def test_renew_release_and_expire_with_fake_clock(store):
    ledger = Ledger(store, FakeClock())
    store.put_instance(vllm_instance(idle_since=at(-100)))
    ledger.grant(Lease(id="A", service="vllm", expires_at=at(10)), 3, now=T0)
    ledger.grant(Lease(id="B", service="vllm", expires_at=at(20)), 3, now=T0)
    ledger.grant(Lease(id="C", service="other"), 3, now=T0)
    assert store.get_instance("vllm").idle_since is None  # a grant makes it busy
    assert ledger.renew("A", at(30)).expires_at == at(30)
    assert ledger.renew("nope", at(30)) is None
    assert ledger.expire(at(19)) == []
    assert [lease.id for lease in ledger.expire(at(20))] == ["B"]
    assert store.get_instance("vllm").idle_since is None  # A still held
    assert ledger.expire(at(20)) == []
    [a] = ledger.expire(at(31))
    assert a.id == "A" and a.expires_at == at(30)
    assert store.get_instance("vllm").idle_since == at(30)  # idle from the lease's end
    assert ledger.release("C", now=at(40)).service == "other"
    assert ledger.release("C") is None
    assert store.leases() == []


def test_memory_only_leases_are_never_written_and_their_idle_time_is_written_behind(store):
    """The gateway's per-request leases (durable=False): counted, renewed and released in memory; the idle time
    they change reaches the store within IDLE_FLUSH_S (or at a flush), and a restart finds them gone."""
    ledger = Ledger(store, FakeClock())
    store.put_instance(vllm_instance(idle_since=at(-5)))

    async def scenario() -> None:
        assert ledger.grant(Lease(id="M1", service="vllm", expires_at=at(120)), 2, now=T0, durable=False)
        assert ledger.grant(Lease(id="M2", service="vllm"), 2, now=T0, durable=False)
        assert not ledger.grant(Lease(id="M3", service="vllm"), 2, now=T0, durable=False)  # they take slots
        assert store.leases() == [] and [lease.id for lease in ledger.leases("vllm")] == ["M1", "M2"]
        assert store.get_instance("vllm").idle_since == at(-5)  # busy, not yet written
        ledger.flush()  # what Runtime.state() does before a pass reads the inventory
        assert store.get_instance("vllm").idle_since is None
        assert ledger.renew("M1", at(300)).expires_at == at(300)
        assert ledger.release("M2", now=at(1)).id == "M2" and ledger.release("M1", now=at(2)).id == "M1"
        assert store.get_instance("vllm").idle_since is None  # the idle time waits (IDLE_FLUSH_S)
        await asyncio.sleep(IDLE_FLUSH_S * 4)
        assert store.get_instance("vllm").idle_since == at(2)  # idle from its last lease's end
        # a durable grant's idle time is written behind as well: the last change within the window wins
        assert ledger.grant(Lease(id="M4", service="vllm"), 2, now=at(3), durable=False)
        assert ledger.release("M4", now=at(3)) is not None
        assert ledger.grant(Lease(id="D1", service="vllm"), 2, now=at(4))
        await asyncio.sleep(IDLE_FLUSH_S * 4)
        assert store.get_instance("vllm").idle_since is None

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="only a service lease granted without a demand"):
        ledger.grant(Lease(id="V", kind="vram", service="vllm", gpu=0, mb=1), 9, now=T0, durable=False)
    assert [lease.id for lease in Ledger(store, FakeClock()).leases()] == ["D1"]  # a restart: memory-only gone


def test_demands_keep_queue_order(store):
    for i in (3, 1, 2):
        store.add_demand(Demand(id=f"D{i}", service="s", requested_at=at(i)))
    store.add_demand(Demand(id="D3", service="s", holder="again"))
    assert [d.id for d in store.demands("s")] == ["D3", "D1", "D2"]
    assert store.demands()[0].holder == "again"
    assert store.remove_demand("D1").id == "D1" and store.remove_demand("D1") is None


def test_backoff_exponential_capped_stalled_and_reset_by_spec(store):
    policy = BackoffPolicy(base_s=2, factor=2, max_s=10, stall_after=3, reset_after_s=60)
    delays = []
    for n in range(5):
        b = record_failure(store, "svc", f"boom {n}", "h1", at(0), policy)
        delays.append((b.next_attempt_at - at(0)).total_seconds())
    assert delays == [2, 4, 8, 10, 10]
    assert b.stalled and b.failures == 5 and b.last_error == "boom 4"
    assert not b.may_attempt(at(9)) and b.may_attempt(at(10))
    assert store.get_backoff("svc").stalled
    assert store.get_backoff("svc").for_spec("h2").failures == 0  # a new spec gets a fresh start
    b = record_failure(store, "svc", "other spec", "h2", at(0), policy)
    assert (b.failures, b.stalled) == (1, False)


def test_backoff_resets_after_staying_healthy(store):
    policy = BackoffPolicy(base_s=1, stall_after=2, reset_after_s=60)
    record_failure(store, "svc", "x", "h", at(0), policy)
    record_failure(store, "svc", "x", "h", at(1), policy)
    b = record_healthy(store, "svc", "h", at(10), policy)
    assert b.healthy_since == at(10) and b.failures == 2
    # crashing soon after becoming healthy keeps counting
    assert record_failure(store, "svc", "x", "h", at(20), policy).failures == 3
    record_healthy(store, "svc", "h", at(30), policy)
    b = record_healthy(store, "svc", "h", at(90), policy)
    assert (b.failures, b.stalled, b.next_attempt_at, b.healthy_since) == (0, False, None, at(30))
    store.reset_backoff("svc")
    assert store.get_backoff("svc").failures == 0


def test_event_log_paging(store):
    ids = [store.record_event("tick", "svc" if i % 2 else None, f"m{i}", {"i": i}) for i in range(7)]
    assert ids == sorted(ids)
    first = store.events(limit=3)
    assert [e.message for e in first] == ["m0", "m1", "m2"]
    rest = store.events(since_id=first[-1].id, limit=100)
    assert [e.message for e in rest] == ["m3", "m4", "m5", "m6"]
    assert [e.data["i"] for e in store.events(service="svc")] == [1, 3, 5]
    assert all(e.ts.tzinfo is not None for e in rest)


def test_naive_datetime_is_refused(store):
    with pytest.raises(StoreError, match="naive datetime"):
        store.expire_leases(datetime(2026, 1, 1))


def test_corrupt_file_is_a_store_error(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not a database, just some bytes\n" * 100)
    with pytest.raises(StoreError, match=r"state\.db.*corrupt"):
        open_store(tmp_path, SYSTEM_CLOCK)


def test_newer_schema_is_refused(tmp_path):
    with open_store(tmp_path, SYSTEM_CLOCK):
        pass
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this reconciler"):
        open_store(tmp_path, SYSTEM_CLOCK)


def test_unusable_state_dir_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create state directory"):
        open_store(tmp_path / "file" / "sub", SYSTEM_CLOCK)


def test_closed_store_raises_store_error(tmp_path):
    s = SqliteStore(tmp_path / "x.db", SYSTEM_CLOCK)
    s.close()
    with pytest.raises(StoreError, match=r"x.db"):
        s.instances()


def test_the_event_log_is_bounded(tmp_path, monkeypatch):
    import reconciler.store.sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "MAX_EVENTS", 30)
    monkeypatch.setattr(sqlite_module, "EVENT_PRUNE_EVERY", 10)
    with open_store(tmp_path, SYSTEM_CLOCK) as store:
        for i in range(100):
            store.record_event("tick", message=str(i))
        kept = store.events(limit=1000)
    assert len(kept) <= 30 + 10
    assert kept[-1].message == "99"


def test_a_batch_keeps_what_did_not_fail_and_a_whole_batch_keeps_nothing(store):
    """batch(): each write is a savepoint, so one that fails is undone alone; batch(whole=True): one that fails
    fails them all (the ledger's grouped commits), and none is rolled back halfway."""
    store.put_lease(Lease(id="kept", service="vllm"))

    def failing_write() -> None:  # a write whose statement fails inside the store's transaction
        with store._tx() as c:
            c.execute("DELETE FROM leases WHERE id = 'A'")
            c.execute("INSERT INTO no_such_table VALUES (1)")

    with store.batch():
        store.put_lease(Lease(id="A", service="vllm"))
        with pytest.raises(StoreError, match="no_such_table"):
            failing_write()
        store.put_lease(Lease(id="B", service="vllm"))
    assert {lease.id for lease in store.leases()} == {"kept", "A", "B"}
    with pytest.raises(StoreError, match="no_such_table"), store.batch(whole=True):
        store.release_lease("kept")
        store.put_lease(Lease(id="C", service="vllm"))
        failing_write()
    assert {lease.id for lease in store.leases()} == {"kept", "A", "B"}
