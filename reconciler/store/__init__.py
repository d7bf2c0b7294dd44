"""State store: inventory, leases, demands, backoff, events and intents (DESIGN §5, §6)."""

from reconciler.store.base import (
    Backoff,
    BackoffPolicy,
    Event,
    Intent,
    Store,
    StoredState,
    spec_hash,
    utcnow,
)
from reconciler.store.sqlite import DB_NAME, SqliteStore, default_state_dir, open_store

__all__ = [
    "DB_NAME",
    "Backoff",
    "BackoffPolicy",
    "Event",
    "Intent",
    "SqliteStore",
    "Store",
    "StoredState",
    "default_state_dir",
    "open_store",
    "spec_hash",
    "utcnow",
]
