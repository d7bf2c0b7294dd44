"""State store: inventory, leases, demands, backoff records, events and intents (DESIGN §5, §6)."""

from reconciler.store.base import Event, Intent, Store, StoredState
from reconciler.store.sqlite import DB_NAME, SqliteStore, default_state_dir, open_store

__all__ = [
    "DB_NAME",
    "Event",
    "Intent",
    "SqliteStore",
    "Store",
    "StoredState",
    "default_state_dir",
    "open_store",
]
