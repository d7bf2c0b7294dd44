"""The SQLite state store: one file, ``<state_dir>/state.db``, with a write-ahead log.

Several connections and processes may share the file: writes run in
``BEGIN IMMEDIATE`` transactions (one writer at a time, others wait up to the
busy timeout), reads see a consistent snapshot. A lease grant counts the
service's unexpired leases and inserts the new one in the same transaction,
so ``max_concurrent`` holds under any concurrency (invariant 4). Every SQLite
failure surfaces as :class:`~reconciler.errors.StoreError` naming the file
and what to do (:mod:`.files` finds which file is at fault).

**Write-ahead log, checkpoints off the request path.** The journal is SQLite's
write-ahead log (``journal_mode=WAL``, ``synchronous=NORMAL``): a commit
appends to ``state.db-wal`` without waiting for the disk (13 µs measured,
against 0.7 ms for a rollback journal's fsyncs), is durable against a crash
of the process (``kill -9`` loses nothing committed; a power cut may lose
the last commits, never the file), and readers never wait for the writer.
Checkpoints — copying the log back into the file, with two ``fdatasync`` —
are not left to SQLite's automatic ones, which run inside whichever commit
crosses 1000 pages (a lease request's): :meth:`SqliteStore.checkpoint` runs
on a worker thread every two seconds instead (:mod:`reconciler.runtime.checkpoints`).
:meth:`SqliteStore.batch` groups many writes into one transaction (each
write a savepoint of it): the ledger writes a lease and its instance's idle
time together.

WAL keeps its index in ``state.db-shm``, mapped into every process that has
the database open. An unusable ``-shm`` (or ``-wal``) is a clear error at
start-up like the database's own file; but a ``-shm`` *truncated* under a
running reconciler (``truncate -s0``, or a program that cannot see its
locks, such as one in another container sharing the directory) kills it
with SIGBUS: no program can catch a fault in a mapping. Nothing of ours
truncates it; do not either. A database an older version left with a
rollback journal is switched to WAL when opened.

**A lock held by someone else** (a ``sqlite3`` shell left in a transaction)
makes a write wait up to the busy timeout — 10 s by default, 0.1 s for the
loop's store (:mod:`reconciler.runtime.assembly`), whose calls run on the
event loop — and then fail (``StoreError``, a ``failed`` notice). After one
write found the database locked, the next ones do not wait at all
(``busy_timeout = 0``) until one gets through: each fails at once while the
lock is held, so a burst of lease requests or a pass retried every few
seconds cannot keep the event loop waiting 0.1 s at a time (and
``/api/health`` answers in milliseconds whatever the lock does). The first
write that commits again restores the busy timeout. Reads never wait for a
writer in WAL mode.

**Start-up.** Before SQLite sees anything, the state directory must be (or
become) a writable directory, and ``state.db`` and its journal, where they
exist, readable and writable regular files; otherwise the store is not
opened, and the error names the file and says what to do (:mod:`.files`).

**While open.** A failure is a ``StoreError`` for the caller, and the first of
a streak is also a :class:`~reconciler.store.base.StoreNotice` (``failed``;
``recovered`` once something works again), which the runtime reports as an
event and this module as a log line. A failed commit is rolled back, so the
connection is usable again as soon as the cause is gone.

**The file deleted or replaced while open.** Before every use the store
compares the file at its path with the one it opened (device and inode, one
``stat``). If ``state.db`` was deleted, or something else was put in its
place, the open connection still reads the old file — all of it, as this
process left it. It is written back: whatever now sits at the path (and its
journal, WAL and index) is renamed to ``state.db.replaced-<UTC time>`` and
kept, the open database is copied (SQLite's backup API) to a new file that is
renamed into place, and the store goes on with that one. The state is the
running reconciler's: it knows which processes it started, and a file put
there behind its back does not. A ``restored`` notice says so, naming the
path; if it cannot be written back, each use fails saying why, until it can.

Stamps (``updated_at``, an intent's ``started_at``/``finished_at``, an event's
``ts`` when the caller gives none, the ``now`` a lease is counted at) come
from the clock the store is opened with: the runtime's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

from pydantic import TypeAdapter

from reconciler.core.backoff import Backoff
from reconciler.core.clock import Clock
from reconciler.core.snapshot import Demand, Instance, Lease
from reconciler.errors import StoreError
from reconciler.store.base import Event, Hold, Intent, StoredState, StoreNotice
from reconciler.store.files import COMPANIONS, check_state_dir, companion, diagnose, file_problem
from reconciler.store.schema import MIGRATIONS, SCHEMA_VERSION

DB_NAME = "state.db"
MAX_EVENTS = 10_000  # the event log keeps this many newest events
EVENT_PRUNE_EVERY = 500
_IDLE_SINCE: TypeAdapter[datetime | None] = TypeAdapter(datetime | None)  # an instance's idle_since, as JSON
_KIND = "coalesce(json_extract(data, '$.kind'), 'service')"  # Lease.kind, kept in the JSON
RESTORED = "was deleted or replaced while running"
CORRUPT_HINT = (
    "the file is corrupt: stop the reconciler, move it aside (with its -wal and -shm, if any) and start again "
    "with an empty state — running services are found again by the marker in their environment; "
    "leases, demands, backoff records and the event log are lost"
)
LOCKED_HINT = (
    "another process holds the database locked (a sqlite3 shell with an open transaction, a reconciler of "
    "an older version?); end it, and the reconciler retries"
)

log = logging.getLogger("reconciler.store")


def default_state_dir() -> Path:
    """``$RECONCILER_STATE_DIR``, else ``$XDG_STATE_HOME/reconciler``, else ``~/.local/state/reconciler``."""
    explicit = os.environ.get("RECONCILER_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        return Path(xdg) / "reconciler"
    return Path.home() / ".local" / "state" / "reconciler"


def open_store(
    state_dir: str | os.PathLike[str] | None, clock: Clock, *, busy_timeout_s: float = 10.0
) -> SqliteStore:
    """Open (creating on first use) the store in ``state_dir`` (None: :func:`default_state_dir`)."""
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    return SqliteStore(directory / DB_NAME, clock, busy_timeout_s=busy_timeout_s)


def _ts(dt: datetime | None) -> str | None:
    """Fixed-width UTC text, so that SQL string comparison is time comparison."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        raise StoreError(f"naive datetime {dt!r}: the store keeps timezone-aware UTC times only")
    return dt.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"  # +00:00 → Z (strftime: 1.5× the time)


@overload
def _dt(text: str) -> datetime: ...


@overload
def _dt(text: None) -> None: ...


def _dt(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _row_id(cursor: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just wrote (sqlite3 types ``lastrowid`` as optional)."""
    assert cursor.lastrowid is not None, "an INSERT sets lastrowid"
    return cursor.lastrowid


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` (None: nothing there, or it cannot be looked at)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SqliteStore:
    """:class:`~reconciler.store.base.Store` on a SQLite file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], clock: Clock, *, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.clock = clock
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._notices: list[StoreNotice] = []
        self._failing: str | None = None  # the error of a failure streak, while it lasts
        self._closed = False
        self._depth = 0  # nested uses of the connection under the lock
        self._hurried = False  # the database was found locked: writes do not wait until one gets through
        self._parsed: dict[str, tuple[str, Instance]] = {}  # service → its row's text and that text parsed
        check_state_dir(self.path.parent)
        for suffix in ("", *COMPANIONS):
            problem = file_problem(companion(self.path, suffix))
            if problem is not None:
                raise StoreError(f"cannot open state store {self.path}: {problem}")
        self._batch = False  # inside batch(): each write is part of one transaction
        self._whole = False  # inside batch(whole=True): without a savepoint of its own
        self._conn = self._connect()
        self._file = _identity(self.path)
        self._wal_files = self._wal_identities()

    def _connect(self) -> sqlite3.Connection:
        """A new connection to the file at ``self.path``, set up and migrated (errors are the caller's to report)."""
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(self._describe("open", exc)) from None
        try:
            with self._errors("open", notify=False):
                self._setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA mmap_size = 0")  # the file is read(), never mapped (the WAL index is, see above)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            why = diagnose(self.path) or "another process holds it with a rollback journal; stop it"
            raise StoreError(f"state store {self.path}: cannot switch to WAL mode (journal mode {mode!r}): {why}")
        conn.execute("PRAGMA synchronous = NORMAL")  # a commit waits for no disk; a checkpoint does (off the path)
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run in the background (checkpoint())
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"state store {self.path} has schema version {version}, newer than this "
                    f"reconciler understands ({SCHEMA_VERSION}); upgrade the reconciler"
                )
            for migration in MIGRATIONS[version:]:
                for statement in migration.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")

    # -- plumbing -----------------------------------------------------------

    def _describe(self, what: str, exc: sqlite3.Error) -> str:
        """``exc`` in words an operator can act on: which file, what to do."""
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            hint = CORRUPT_HINT
        elif "locked" in text or "busy" in text:
            hint = LOCKED_HINT
        else:
            hint = diagnose(self.path) or (
                f"check that {self.path.parent} and the {self.path.name} files in it are readable and writable "
                f"by uid {os.geteuid()} and that its disk is not full, or use another --state-dir"
            )
        return f"state store {self.path}: {what} failed: {text} ({hint})"

    def _notice(self, kind: Literal["failed", "recovered", "restored"], message: str) -> None:
        log.warning("%s", message)
        self._notices.append(StoreNotice(kind, message, str(self.path)))

    def _failed(self, message: str) -> None:
        if self._failing is None:
            self._notice("failed", message)
        self._failing = message

    def _worked(self) -> None:
        if self._failing is not None:
            self._failing = None
            self._notice("recovered", f"state store {self.path} works again")

    def take_notices(self) -> list[StoreNotice]:
        """What happened to the store since the last call (see :class:`~reconciler.store.base.StoreNotice`)."""
        with self._lock:
            notices, self._notices = self._notices, []
        return notices

    @contextmanager
    def _errors(self, what: str, *, notify: bool = True) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            message = self._describe(what, exc)
            if notify:
                self._failed(message)
            raise StoreError(message) from None

    @contextmanager
    def _use(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection, for one read or write, once the file at the path is known to be ours."""
        with self._lock:
            if self._closed:
                raise StoreError(f"state store {self.path} is closed; open it again")
            if not self._depth:  # a use inside another (state() reads three tables) is the same use
                self._verify()
            self._depth += 1
            try:
                with self._errors(what):
                    try:
                        yield self._conn
                    except sqlite3.OperationalError as exc:
                        if _locked(exc):
                            self._hurry()
                        raise
            finally:
                self._depth -= 1
            self._worked()

    def _hurry(self) -> None:
        """The database was found locked: from now on a write does not wait for the lock (see the module)."""
        if not self._hurried:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA busy_timeout = 0")
                self._hurried = True

    def _patient(self) -> None:
        """A write got through: the lock is free again, so wait for it as usual."""
        if self._hurried:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                self._hurried = False

    def _verify(self) -> None:
        """Write the state back if ``state.db`` was deleted or replaced since it was opened."""
        if self._file is not None and _identity(self.path) == self._file:
            return
        try:
            aside = self._restore()
        except (OSError, sqlite3.Error, StoreError) as exc:
            why = diagnose(self.path) or (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            message = f"{self.path} {RESTORED}, and the state cannot be written back: {why}"
            if "--state-dir" not in message:
                message += "; fix that, or use another --state-dir"
            self._failed(message)
            raise StoreError(message) from None
        kept = f"; what was found there is kept as {aside}" if aside else ""
        self._notice("restored", f"{self.path} {RESTORED}; the state this reconciler holds (inventory, leases, "
                                 f"demands, backoff, intents, event log) was written back{kept}")

    def _wal_identities(self) -> dict[str, tuple[int, int] | None]:
        """Our write-ahead log and its index (device, inode), to tell them from files put there later."""
        return {suffix: _identity(companion(self.path, suffix)) for suffix in ("-wal", "-shm")}

    def _restore(self) -> Path | None:
        """Write the open database back to a new file at the path; returns where a file found there was moved.

        The open connection still reads the old file (deleted, or replaced under
        it), so first everything it holds is copied into memory. Then what sits at
        the path — but not our own write-ahead log and index, which a foreign
        database must never be paired with — is moved aside, the old connection is
        closed (leaving WAL, SQLite deletes the log *by name*: ours, which is
        abandoned), and the copy is written to a new file that takes the path.
        """
        check_state_dir(self.path.parent)
        memory = sqlite3.connect(":memory:", isolation_level=None)
        try:
            self._conn.backup(memory)
            aside = self._move_aside()
            old = self._conn
            old.close()
            for suffix in ("-wal", "-shm"):
                path = companion(self.path, suffix)
                if self._wal_files.get(suffix) is not None and _identity(path) == self._wal_files[suffix]:
                    with contextlib.suppress(OSError):
                        path.unlink()  # ours, abandoned with the old file
            copy = self.path.with_name(f"{self.path.name}.restoring-{os.getpid()}")
            try:
                for suffix in ("", *COMPANIONS):
                    companion(copy, suffix).unlink(missing_ok=True)
                target = sqlite3.connect(copy, isolation_level=None)
                try:
                    memory.backup(target)
                finally:
                    target.close()
                os.replace(copy, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    copy.unlink(missing_ok=True)
                raise
        finally:
            memory.close()
        _fsync_dir(self.path.parent)
        self._conn = self._connect()
        self._file = _identity(self.path)
        self._wal_files = self._wal_identities()
        return aside

    def _move_aside(self) -> Path | None:
        """Rename what was put at the path (and its companions, not ours) to ``state.db.replaced-<time>``."""
        found = {suffix: companion(self.path, suffix) for suffix in ("", *COMPANIONS)}
        theirs = {suffix: path for suffix, path in found.items() if os.path.lexists(path) and not (
            suffix in self._wal_files and self._wal_files[suffix] is not None
            and _identity(path) == self._wal_files[suffix])}
        if not theirs:
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")  # a name for the operator: the host's time
        base = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
        n = 1
        while any(os.path.lexists(companion(base, suffix)) for suffix in ("", *COMPANIONS)):
            n += 1
            base = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}")
        aside: Path | None = None
        for suffix, path in theirs.items():
            os.rename(path, companion(base, suffix))
            aside = aside or companion(base, suffix)
        return aside

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with the write lock up front (no upgrade deadlocks).

        Inside :meth:`batch` it is a savepoint of the batch's transaction: a write
        that fails is undone alone, and the others commit together; inside
        ``batch(whole=True)`` it is a plain part of it.
        """
        if self._whole:
            with self._use("write") as conn:
                yield conn
            return
        if self._batch:
            with self._use("write") as conn:
                conn.execute("SAVEPOINT one")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK TO one")
                    conn.execute("RELEASE one")
                    raise
                conn.execute("RELEASE one")
            return
        with self._use("write") as conn:
            _rollback(conn)  # a commit that failed may have left its transaction open
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self._patient()

    @contextmanager
    def batch(self, *, whole: bool = False) -> Iterator[None]:
        """Many writes, one transaction: each write inside is a savepoint; all commit at the end, once.

        ``whole=True``: all or nothing, without a savepoint per write (two statements each): a write that fails
        fails the batch, and every write of it is rolled back (the ledger's grouped commits).
        Inside another batch it adds to that one (the outer batch commits)."""
        if self._batch:
            yield
            return
        with self._use("write") as conn:
            _rollback(conn)
            conn.execute("BEGIN IMMEDIATE")
            self._batch, self._whole = True, whole
            try:
                yield
            except BaseException:
                self._batch = self._whole = False
                _rollback(conn)
                raise
            self._batch = self._whole = False
            try:
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self._patient()

    def checkpoint(self, *, truncate: bool = False) -> int:
        """Copy the write-ahead log back into the file as far as no reader needs it; returns the log's pages.

        On a connection of its own, so that any thread may call it while the store is in use (a passive
        checkpoint blocks no writer); ``truncate`` also empties the log (when nothing else uses it)."""
        mode = "TRUNCATE" if truncate else "PASSIVE"
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(self._describe("checkpoint", exc)) from None
        return int(row[1]) if row and row[1] is not None else 0

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._use("read") as conn:
            return conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        version: int = self._read("PRAGMA user_version")[0][0]
        return version

    # -- inventory ------------------------------------------------------------

    def put_instance(self, instance: Instance) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO instances(service, data, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(service) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
                (instance.service, instance.model_dump_json(), _ts(self.clock.now())),
            )

    def get_instance(self, service: str) -> Instance | None:
        """The service's instance; its row is read every time, and parsed again only when its text changed (an
        Instance is frozen: the gateway's warm path reads it per request, and the parse was most of the read)."""
        rows = self._read("SELECT data FROM instances WHERE service = ?", (service,))
        if not rows:
            return None
        return self._parse(service, rows[0][0])

    def instances(self) -> list[Instance]:
        """Every instance, by service; like :meth:`get_instance`, a row is parsed again only when its text changed
        (a watch reads the inventory a few times a pass, every second in the demo)."""
        rows = self._read("SELECT service, data FROM instances ORDER BY service")
        return [self._parse(service, text) for service, text in rows]

    def _parse(self, service: str, text: str) -> Instance:
        parsed = self._parsed.get(service)
        if parsed is not None and parsed[0] == text:
            return parsed[1]
        instance = Instance.model_validate_json(text)
        self._parsed[service] = (text, instance)
        return instance

    def remove_instance(self, service: str) -> Instance | None:
        with self._tx() as c:
            row = c.execute("DELETE FROM instances WHERE service = ? RETURNING data", (service,)).fetchone()
        return Instance.model_validate_json(row[0]) if row else None

    def set_idle_since(self, service: str, when: datetime | None) -> None:
        """Record when the service's instance became idle (None: busy); no instance, no change."""
        value = _IDLE_SINCE.dump_json(when).decode()  # as the instance's own JSON writes the field
        with self._tx() as c:  # in place (SQLite's JSON functions): no parse and dump of the instance per lease
            c.execute(
                "UPDATE instances SET data = json_set(data, '$.idle_since', json(?)), updated_at = ? "
                "WHERE service = ? AND json_extract(data, '$.idle_since') IS NOT json_extract(?, '$')",
                (value, _ts(self.clock.now()), service, value),
            )

    # -- leases and demands (invariant 4) ---------------------------------------

    def grant_lease(
        self, lease: Lease, max_concurrent: int, *, demand_id: str | None = None, now: datetime | None = None
    ) -> bool:
        """Grant ``lease`` unless its service already holds ``max_concurrent`` unexpired leases.

        Only leases of the same ``kind`` count: a ``vram`` lease (a bare VRAM
        reservation) never takes a ``service`` lease's slot, and vice versa.

        Returns False (and changes nothing) when refused. Granting an id that is
        already held is a no-op returning True, so a replayed grant is harmless.
        ``demand_id``, when given, is removed in the same transaction.
        """
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        now_ts = _ts(now or self.clock.now())
        with self._tx() as c:
            if c.execute("SELECT 1 FROM leases WHERE id = ?", (lease.id,)).fetchone():
                return True
            held = c.execute(
                f"SELECT COUNT(*) FROM leases WHERE service = ? AND {_KIND} = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (lease.service, lease.kind, now_ts),
            ).fetchone()[0]
            if held >= max_concurrent:
                return False
            c.execute(
                "INSERT INTO leases(id, service, expires_at, granted_at, data) VALUES (?, ?, ?, ?, ?)",
                (lease.id, lease.service, _ts(lease.expires_at), now_ts, lease.model_dump_json()),
            )
            if demand_id is not None:
                c.execute("DELETE FROM demands WHERE id = ?", (demand_id,))
            return True

    def put_lease(self, lease: Lease, *, demand_id: str | None = None, now: datetime | None = None) -> None:
        """Persist a lease the caller granted (the ledger counts ``max_concurrent``), removing ``demand_id``
        in the same transaction; an id already held is left as it is."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO leases(id, service, expires_at, granted_at, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO NOTHING",
                (lease.id, lease.service, _ts(lease.expires_at), _ts(now or self.clock.now()),
                 lease.model_dump_json()),
            )
            if demand_id is not None:
                c.execute("DELETE FROM demands WHERE id = ?", (demand_id,))

    def renew_lease(self, lease_id: str, expires_at: datetime | None) -> Lease | None:
        """Move a lease's expiry; None when there is no such lease (it expired or was released)."""
        with self._tx() as c:
            row = c.execute("SELECT data FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if row is None:
                return None
            lease = Lease.model_validate_json(row[0]).model_copy(update={"expires_at": expires_at})
            c.execute(
                "UPDATE leases SET expires_at = ?, data = ? WHERE id = ?",
                (_ts(expires_at), lease.model_dump_json(), lease_id),
            )
        return lease

    def release_lease(self, lease_id: str) -> bool:
        """Remove a lease; False when there was none (the ledger holds the lease itself: nothing is parsed)."""
        with self._tx() as c:
            return c.execute("DELETE FROM leases WHERE id = ?", (lease_id,)).rowcount > 0

    def expire_leases(self, now: datetime) -> list[Lease]:
        """Remove and return the leases whose ``expires_at`` is at or before ``now``."""
        with self._tx() as c:
            rows = c.execute(
                "DELETE FROM leases WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING data",
                (_ts(now),),
            ).fetchall()
        return sorted((Lease.model_validate_json(r[0]) for r in rows), key=lambda lease: (lease.expires_at, lease.id))

    def leases(self, service: str | None = None) -> list[Lease]:
        if service is None:
            rows = self._read("SELECT data FROM leases ORDER BY seq")
        else:
            rows = self._read("SELECT data FROM leases WHERE service = ? ORDER BY seq", (service,))
        return [Lease.model_validate_json(r[0]) for r in rows]

    def add_demand(self, demand: Demand) -> None:
        """Queue a demand; re-adding an id replaces it but keeps its place in the queue."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO demands(id, service, data) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET service = excluded.service, data = excluded.data",
                (demand.id, demand.service, demand.model_dump_json()),
            )

    def remove_demand(self, demand_id: str) -> Demand | None:
        with self._tx() as c:
            row = c.execute("DELETE FROM demands WHERE id = ? RETURNING data", (demand_id,)).fetchone()
        return Demand.model_validate_json(row[0]) if row else None

    def demands(self, service: str | None = None) -> list[Demand]:
        if service is None:
            rows = self._read("SELECT data FROM demands ORDER BY seq")
        else:
            rows = self._read("SELECT data FROM demands WHERE service = ? ORDER BY seq", (service,))
        return [Demand.model_validate_json(r[0]) for r in rows]

    def state(self) -> StoredState:
        """Instances, leases and demands read in one consistent transaction."""
        with self._use("read") as conn:
            _rollback(conn)
            conn.execute("BEGIN")
            try:
                instances = self.instances()
                leases = self.leases()
                demands = self.demands()
            finally:
                _rollback(conn)  # read only: ending it either way is the same
        return StoredState(instances=instances, leases=leases, demands=demands)

    # -- backoff (invariant 6) --------------------------------------------------

    _BACKOFF_COLS = "service, failures, next_attempt_at, stalled, last_error, spec_hash, healthy_since"

    @staticmethod
    def _backoff(row: tuple[Any, ...]) -> Backoff:
        service, failures, next_at, stalled, last_error, digest, healthy = row
        return Backoff(service, failures, _dt(next_at), bool(stalled), last_error, digest, _dt(healthy))

    def _load_backoff(self, c: sqlite3.Connection, service: str) -> Backoff:
        row = c.execute(f"SELECT {self._BACKOFF_COLS} FROM backoff WHERE service = ?", (service,)).fetchone()
        return self._backoff(row) if row else Backoff(service)

    def _save_backoff(self, c: sqlite3.Connection, b: Backoff) -> None:
        c.execute(
            f"INSERT OR REPLACE INTO backoff({self._BACKOFF_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (b.service, b.failures, _ts(b.next_attempt_at), int(b.stalled), b.last_error, b.spec_hash,
             _ts(b.healthy_since)),
        )

    def get_backoff(self, service: str) -> Backoff:
        """The service's record (a fresh one when none is kept)."""
        with self._use("read") as conn:
            return self._load_backoff(conn, service)

    def update_backoff(self, service: str, change: Callable[[Backoff], Backoff]) -> Backoff:
        """Apply ``change`` to the service's record in one transaction; returns the new record."""
        with self._tx() as c:
            new = change(self._load_backoff(c, service))
            self._save_backoff(c, new)
        return new

    def reset_backoff(self, service: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM backoff WHERE service = ?", (service,))

    # -- holds and meta ---------------------------------------------------------

    def hold(self, service: str, reason: str) -> bool:
        """Hold ``service`` stopped; False when it was held already (its first stamp and reason are kept)."""
        with self._tx() as c:
            row = c.execute("INSERT OR IGNORE INTO holds(service, since, reason) VALUES (?, ?, ?) RETURNING service",
                            (service, _ts(self.clock.now()), reason)).fetchone()
        return row is not None

    def unhold(self, service: str) -> bool:
        """Let ``service`` run again; False when it was not held."""
        with self._tx() as c:
            row = c.execute("DELETE FROM holds WHERE service = ? RETURNING service", (service,)).fetchone()
        return row is not None

    def holds(self) -> dict[str, Hold]:
        rows = self._read("SELECT service, since, reason FROM holds ORDER BY service")
        return {service: Hold(service, _dt(since), reason) for service, since, reason in rows}

    def set_meta(self, key: str, value: str | None) -> None:
        with self._tx() as c:
            if value is None:
                c.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    # -- event log ------------------------------------------------------------

    def record_event(
        self, kind: str, service: str | None = None, message: str = "",
        data: Mapping[str, Any] | None = None, *, ts: datetime | None = None, event_id: int | None = None,
    ) -> int:
        """Append one event (with ``event_id`` when the caller numbers events itself); returns its id."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO events(id, ts, kind, service, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                (event_id, _ts(ts or self.clock.now()), kind, service, message,
                 json.dumps(dict(data or {}), sort_keys=True)),
            )
            event_id = _row_id(cur)
            if event_id % EVENT_PRUNE_EVERY == 0:  # the log is bounded: the newest MAX_EVENTS stay
                c.execute("DELETE FROM events WHERE id <= ?", (event_id - MAX_EVENTS,))
            return event_id

    def record_events(self, events: Sequence[Event]) -> None:
        """Append events the caller numbered, in one transaction (an id already there is left as it is)."""
        if not events:
            return
        with self._tx() as c:
            c.executemany(
                "INSERT INTO events(id, ts, kind, service, message, data) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO NOTHING",
                [(e.id, _ts(e.ts), e.kind, e.service, e.message, json.dumps(e.data, sort_keys=True, default=str))
                 for e in events],
            )
            newest = max(e.id for e in events)
            if newest // EVENT_PRUNE_EVERY != (newest - len(events)) // EVENT_PRUNE_EVERY:
                c.execute("DELETE FROM events WHERE id <= ?", (newest - MAX_EVENTS,))  # the log is bounded

    def last_event_id(self) -> int:
        """The newest event's id (0 for none): where a process that numbers its events goes on from."""
        rows = self._read("SELECT COALESCE(MAX(id), 0) FROM events")
        return int(rows[0][0])

    def events(self, since_id: int = 0, limit: int = 100, service: str | None = None) -> list[Event]:
        """Events with ``id > since_id``, oldest first, at most ``limit``."""
        sql = "SELECT id, ts, kind, service, message, data FROM events WHERE id > ?"
        params: tuple[Any, ...] = (since_id,)
        if service is not None:
            sql += " AND service = ?"
            params += (service,)
        rows = self._read(sql + " ORDER BY id LIMIT ?", (*params, limit))
        return [Event(r[0], _dt(r[1]), r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    # -- intents (invariant 5) --------------------------------------------------

    _INTENT_COLS = "id, action_id, kind, service, data, started_at, finished_at, outcome"

    @staticmethod
    def _intent(row: tuple[Any, ...]) -> Intent:
        iid, action_id, kind, service, data, started, finished, outcome = row
        return Intent(iid, action_id, kind, service, json.loads(data), _dt(started), _dt(finished), outcome)

    def begin_intent(
        self, action_id: str, kind: str, service: str | None, data: Mapping[str, Any] | None = None
    ) -> int:
        """Write down an action before taking it; returns the intent id."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO intents(action_id, kind, service, data, started_at) VALUES (?, ?, ?, ?, ?)",
                (action_id, kind, service, json.dumps(dict(data or {}), sort_keys=True), _ts(self.clock.now())),
            )
            return _row_id(cur)

    def _merge_intent(
        self, intent_id: int, data: Mapping[str, Any] | None, outcome: str | None
    ) -> Intent:
        with self._tx() as c:
            row = c.execute(f"SELECT {self._INTENT_COLS} FROM intents WHERE id = ?", (intent_id,)).fetchone()
            if row is None:
                raise StoreError(f"state store {self.path}: no intent {intent_id}")
            intent = self._intent(row)
            if intent.outcome is not None:
                raise StoreError(f"state store {self.path}: intent {intent_id} already finished ({intent.outcome})")
            merged = {**intent.data, **dict(data or {})}
            finished = _ts(self.clock.now()) if outcome is not None else None
            row = c.execute(
                f"UPDATE intents SET data = ?, finished_at = ?, outcome = ? WHERE id = ? RETURNING {self._INTENT_COLS}",
                (json.dumps(merged, sort_keys=True), finished, outcome, intent_id),
            ).fetchone()
        return self._intent(row)

    def update_intent(self, intent_id: int, data: Mapping[str, Any]) -> Intent:
        """Merge ``data`` into an open intent (e.g. pid and create_time once the process exists)."""
        return self._merge_intent(intent_id, data, None)

    def finish_intent(self, intent_id: int, outcome: str, data: Mapping[str, Any] | None = None) -> Intent:
        if not outcome:
            raise ValueError("an intent's outcome must be a non-empty string")
        return self._merge_intent(intent_id, data, outcome)

    def open_intents(self) -> list[Intent]:
        """Intents begun but never finished: what a crashed reconciler was doing."""
        rows = self._read(f"SELECT {self._INTENT_COLS} FROM intents WHERE finished_at IS NULL ORDER BY id")
        return [self._intent(r) for r in rows]

    def get_intent(self, intent_id: int) -> Intent | None:
        rows = self._read(f"SELECT {self._INTENT_COLS} FROM intents WHERE id = ?", (intent_id,))
        return self._intent(rows[0]) if rows else None


def _locked(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _rollback(conn: sqlite3.Connection) -> None:
    """End the connection's open transaction, if any (it may already be gone with a failed statement)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
