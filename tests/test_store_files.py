"""The store's files on disk: what SQLite maps, unusable files at start-up, a file deleted or replaced while open.

Real SQLite files in a tmp directory. The suite runs as root here, where
permission bits stop nothing; a file that cannot be used is made by its
*type* instead (a directory or a dangling symlink where SQLite wants a file,
a file where the state directory should be), which fails the same way for
root and for anyone else.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.core.backoff import DEFAULT_POLICY, after_failure
from reconciler.core.snapshot import Demand, Instance, Launch, Lease
from reconciler.errors import StoreError
from reconciler.store import open_store
from reconciler.testing.clock import T0, FakeClock

RESTORED = "was deleted or replaced while running"


def instance(service: str = "vllm", pid: int = 5151) -> Instance:
    return Instance(service=service, gpu=0, origin="started", pid=pid, create_time=1763800100.25, model="qwen",
                    launch=Launch(argv=["/opt/vllm", "--port", "8000"], port=8000), state="running", since=T0)


def fill(store) -> dict:
    """One of everything the store keeps; returns what was written."""
    lease = Lease(id="L1", service="vllm", holder="kiwi", gpu=0, mb=100)
    demand = Demand(id="D1", service="comfy", holder="batch", requested_at=T0)
    store.put_instance(instance())
    assert store.grant_lease(lease, max_concurrent=1)
    store.add_demand(demand)
    store.update_backoff("comfy", lambda old: after_failure(old, "exited", "digest", T0, DEFAULT_POLICY))
    intent = store.begin_intent("start:comfy", "start", "comfy", {"gpu": 0})
    store.record_event("pass", message="one pass")
    return {"instances": [instance()], "leases": [lease], "demands": [demand], "intent": intent}


def test_the_database_is_read_not_mapped_and_checkpoints_wait_for_the_background(tmp_path):
    # WAL: commits append to state.db-wal and never wait for the disk; SQLite's automatic checkpoints
    # (inside whichever commit crosses 1000 pages: a lease request's) are off, the runtime's journal
    # checkpoints in the background. Only the WAL index (-shm) is mapped, never the database itself.
    state = tmp_path.resolve()
    with open_store(state, FakeClock()) as store:
        fill(store)
        for n in range(1500):
            store.record_event("tick", message=f"event {n} " + "x" * 500)
        maps = Path("/proc/self/maps").read_text()
        mapped = {line.split()[-1] for line in maps.splitlines() if str(state) in line}
        assert mapped == {str(state / "state.db-shm")}, mapped
        grown = (state / "state.db-wal").stat().st_size
        assert grown > 1000 * 4096, "an automatic checkpoint ran inside a commit"
        assert store.checkpoint() > 0
    conn = sqlite3.connect(state / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_a_database_left_with_a_rollback_journal_is_taken_over_with_its_content(tmp_path):
    with open_store(tmp_path, FakeClock()) as store:
        fill(store)
    conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("UPDATE instances SET data = json_set(data, '$.model', 'from-before')")
    conn.close()
    with open_store(tmp_path, FakeClock()) as store:
        assert store.instances() == [instance().model_copy(update={"model": "from-before"})]
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


# --- start-up: a file or directory the store cannot use -----------------------------------------


def _state_dir_is_a_file(state: Path) -> None:
    state.write_text("not a directory\n")


def _db_is_a_directory(state: Path) -> None:
    (state / "state.db").mkdir(parents=True)


def _db_is_a_dangling_symlink(state: Path) -> None:
    state.mkdir()
    (state / "state.db").symlink_to(state / "gone" / "state.db")


def _journal_is_a_directory(state: Path) -> None:
    (state / "state.db-journal").mkdir(parents=True)


def _shm_of_a_wal_database_is_a_directory(state: Path) -> None:
    state.mkdir()
    conn = sqlite3.connect(state / "state.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t(x)")
    conn.close()
    (state / "state.db-shm").mkdir()


@pytest.mark.parametrize(("make", "culprit", "problem"), [
    (_state_dir_is_a_file, "", "is not a directory"),
    (_db_is_a_directory, "state.db", "is a directory"),
    (_db_is_a_dangling_symlink, "state.db", "is a dangling symlink"),
    (_journal_is_a_directory, "state.db-journal", "is a directory"),
    (_shm_of_a_wal_database_is_a_directory, "state.db-shm", "is a directory"),
])
def test_an_unusable_file_is_a_store_error_that_names_it_and_says_what_to_do(tmp_path, make, culprit, problem):
    state = tmp_path / "state"
    make(state)
    with pytest.raises(StoreError) as caught:
        open_store(state, FakeClock())
    message = str(caught.value)
    named = state / culprit if culprit else state
    assert f"{named} {problem}" in message, message
    assert "--state-dir" in message, message  # what to do: fix it, or use another state directory


# --- the database file deleted or replaced while the store is open -------------------------------


def test_a_deleted_database_is_written_back_from_the_open_store(tmp_path):
    db = tmp_path / "state.db"
    with open_store(tmp_path, FakeClock()) as store:
        written = fill(store)
        db.unlink()
        assert store.instances() == written["instances"]  # the next use notices and writes it all back
        [notice] = store.take_notices()
        assert notice.kind == "restored" and f"{db} {RESTORED}" in notice.message, notice
        assert store.take_notices() == []
        assert db.is_file()  # (a new file: it may reuse the deleted one's inode number, which is now free)
        store.put_instance(instance("other", pid=6000))  # and it goes on writing to the file at the path
    with open_store(tmp_path, FakeClock()) as again:
        assert [i.service for i in again.instances()] == ["other", "vllm"]
        assert again.leases() == written["leases"] and again.demands() == written["demands"]
        assert again.get_backoff("comfy").failures == 1
        assert [i.id for i in again.open_intents()] == [written["intent"]]
        assert [e.message for e in again.events()] == ["one pass"]


def test_a_replaced_database_is_kept_aside_and_ours_written_back(tmp_path):
    db = tmp_path / "state.db"
    with open_store(tmp_path, FakeClock()) as store:
        written = fill(store)
        with open_store(tmp_path / "elsewhere", FakeClock()) as other:
            other.put_instance(instance("stranger", pid=7000))
        os.replace(tmp_path / "elsewhere" / "state.db", db)  # e.g. a backup put back while running
        assert store.leases() == written["leases"]
        [notice] = store.take_notices()
        [aside] = [p for p in sorted(tmp_path.glob("state.db.replaced-*")) if not p.name.endswith(("-wal", "-shm"))]
        assert notice.kind == "restored" and f"{db} {RESTORED}" in notice.message, notice
        assert str(aside) in notice.message, notice
    with open_store(tmp_path, FakeClock()) as again:
        assert again.instances() == written["instances"]
    conn = sqlite3.connect(aside)
    try:
        assert [r[0] for r in conn.execute("SELECT service FROM instances")] == ["stranger"]
    finally:
        conn.close()


def test_when_the_database_cannot_be_written_back_each_use_says_why_until_it_can(tmp_path):
    state = tmp_path / "state"
    with open_store(state, FakeClock()) as store:
        written = fill(store)
        shutil.rmtree(state)
        state.write_text("a file where the state directory was\n")
        for _ in range(2):
            with pytest.raises(StoreError) as caught:
                store.instances()
            message = str(caught.value)
            assert f"{state / 'state.db'} {RESTORED}" in message, message
            assert f"{state} is not a directory" in message and "--state-dir" in message, message
        state.unlink()
        assert store.instances() == written["instances"]  # the directory is made again, the state written back
        assert [n.kind for n in store.take_notices()] == ["failed", "restored", "recovered"]
    with open_store(state, FakeClock()) as again:
        assert again.leases() == written["leases"]


def test_a_store_that_fails_while_open_names_the_file_and_works_again_once_it_is_fixed(tmp_path):
    with open_store(tmp_path, FakeClock(), busy_timeout_s=0.05) as store:
        fill(store)
        shell = sqlite3.connect(tmp_path / "state.db", isolation_level=None)  # someone's sqlite3 shell
        shell.execute("BEGIN IMMEDIATE")  # holds the write lock
        with pytest.raises(StoreError) as caught:
            store.put_instance(instance("other", pid=6000))
        message = str(caught.value)
        assert str(tmp_path / "state.db") in message and "locked" in message, message
        shell.execute("ROLLBACK")
        shell.close()
        store.put_instance(instance("other", pid=6000))
        assert [i.service for i in store.instances()] == ["other", "vllm"]
        notices = store.take_notices()
        assert [n.kind for n in notices] == ["failed", "recovered"] and notices[0].message == message


def test_after_a_write_met_the_lock_the_next_ones_do_not_wait_for_it_until_one_gets_through(tmp_path):
    """Issue 8.9: the loop's store must not keep the event loop waiting a busy timeout per write while
    someone holds the lock; the first write waits (and fails), the next ones fail at once, and the
    first that commits after the lock is gone makes writes wait as usual again."""
    def waits(store) -> int:
        return store._conn.execute("PRAGMA busy_timeout").fetchone()[0]

    with open_store(tmp_path, FakeClock(), busy_timeout_s=0.2) as store:
        fill(store)
        assert waits(store) == 200
        shell = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        shell.execute("BEGIN IMMEDIATE")
        for _ in range(3):
            with pytest.raises(StoreError, match="locked"):
                store.put_instance(instance("other", pid=6000))
            assert waits(store) == 0  # the next write fails at once while the lock is held
        assert [i.service for i in store.instances()] == ["vllm"]  # reads go on (WAL)
        assert waits(store) == 0  # a read says nothing about the lock
        shell.execute("ROLLBACK")
        shell.close()
        store.put_instance(instance("other", pid=6000))
        assert waits(store) == 200
        assert [i.service for i in store.instances()] == ["other", "vllm"]


# --- permissions: another user's files (real uids; as root, in a child that drops to uid 65534) ------------------

NOBODY = 65534


def _open_as_someone_else(state: Path) -> str:
    """Open the store in ``state`` as a user without write permission there; the error it gives ('' if none).

    Run as root (this suite's usual case), the open happens in a forked child that
    became uid/gid 65534 first, since permission bits stop nothing for root.
    """
    def attempt() -> str:
        try:
            open_store(state, FakeClock()).close()
        except StoreError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - said back to the test, which shows it
            return f"not a StoreError: {type(exc).__name__}: {exc}"
        return ""

    if os.geteuid() != 0:
        return attempt()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, attempt().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    assert os.waitpid(child, 0)[1] == 0
    return said


@pytest.fixture
def shared_dir():
    """A directory another user can reach (pytest's tmp directories are private to their owner)."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="reconciler-perm-"))
    top.chmod(0o755)
    yield top
    for path in [top, *top.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(top)


def _not_writable_for_them(path: Path, mode: int) -> None:
    path.chmod(mode if os.geteuid() == 0 else mode & 0o555)


def test_files_of_another_user_are_named_with_what_to_do(shared_dir):
    readonly_db = shared_dir / "readonly-db"
    open_store(readonly_db, FakeClock()).close()
    readonly_db.chmod(0o777)
    _not_writable_for_them(readonly_db / "state.db", 0o644)

    readonly_dir = shared_dir / "readonly-dir"
    open_store(readonly_dir, FakeClock()).close()
    (readonly_dir / "state.db").chmod(0o666)
    _not_writable_for_them(readonly_dir, 0o755)

    wal_left = shared_dir / "wal-left"  # an older reconciler's WAL database, its -shm not theirs
    open_store(wal_left, FakeClock()).close()
    wal_left.chmod(0o777)
    (wal_left / "state.db").chmod(0o666)
    crashed = ("import os, sqlite3, sys\nconn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
               "conn.execute('PRAGMA journal_mode = WAL')\nconn.execute('DELETE FROM events')\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", crashed, str(wal_left / "state.db")], check=True, timeout=60)
    (wal_left / "state.db-wal").chmod(0o666)
    _not_writable_for_them(wal_left / "state.db-shm", 0o644)

    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    for state, culprit, problem in (
        (readonly_db, readonly_db / "state.db", f"is not readable and writable by uid {uid}"),
        (readonly_dir, readonly_dir, f"is not writable by uid {uid}"),
        (wal_left, wal_left / "state.db-shm", f"is not readable and writable by uid {uid}"),
    ):
        said = _open_as_someone_else(state)
        assert f"{culprit} {problem}" in said, said
        assert "--state-dir" in said and ("chown" in said or "chmod" in said), said
