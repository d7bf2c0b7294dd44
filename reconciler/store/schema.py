"""The SQLite schema, versioned with ``PRAGMA user_version``.

``MIGRATIONS[n]`` brings a database from version ``n`` to ``n + 1``; a new
database runs them all. A database newer than :data:`SCHEMA_VERSION` is
refused rather than guessed at. Rows keep the pydantic models as JSON next to
the columns that queries need, so adding a model field needs no migration.
"""

from __future__ import annotations

_V1 = """
CREATE TABLE instances (
    service     TEXT PRIMARY KEY,
    data        TEXT NOT NULL,            -- snapshot.Instance as JSON
    updated_at  TEXT NOT NULL
);
CREATE TABLE leases (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    service     TEXT NOT NULL,
    expires_at  TEXT,                     -- NULL = until released
    granted_at  TEXT NOT NULL,
    data        TEXT NOT NULL             -- snapshot.Lease as JSON
);
CREATE INDEX leases_by_service ON leases(service);
CREATE INDEX leases_by_expiry ON leases(expires_at);
CREATE TABLE demands (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    service     TEXT NOT NULL,
    data        TEXT NOT NULL             -- snapshot.Demand as JSON
);
CREATE TABLE backoff (
    service         TEXT PRIMARY KEY,
    failures        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    stalled         INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    spec_hash       TEXT,
    healthy_since   TEXT
);
CREATE TABLE events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts       TEXT NOT NULL,
    kind     TEXT NOT NULL,
    service  TEXT,
    message  TEXT NOT NULL,
    data     TEXT NOT NULL
);
CREATE INDEX events_by_service ON events(service, id);
CREATE TABLE intents (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    action_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    service      TEXT,
    data         TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    outcome      TEXT
);
CREATE INDEX intents_open ON intents(id) WHERE finished_at IS NULL;
"""

# 2: what an operator asked for that outlives a pass — services held stopped (`reconciler stop`, `down`) —
# and a few facts about the reconciler using this directory (the API's address, the profile), for `down`.
_V2 = """
CREATE TABLE holds (
    service  TEXT PRIMARY KEY,
    since    TEXT NOT NULL,
    reason   TEXT NOT NULL
);
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"""

MIGRATIONS: list[str] = [_V1, _V2]
SCHEMA_VERSION = len(MIGRATIONS)
