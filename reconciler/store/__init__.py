"""State store: inventory, leases, demands, backoff records, events and intents (DESIGN §5, §6).

:mod:`.base` is the interface, :mod:`.sqlite` the SQLite file that implements
it, :mod:`.files` what is wrong with a state directory or file SQLite cannot
use, and :mod:`.schema` its tables.
"""

from reconciler.store.base import Event, Hold, Intent, Store, StoredState, StoreNotice
from reconciler.store.files import check_state_dir
from reconciler.store.sqlite import DB_NAME, SqliteStore, default_state_dir, open_store

__all__ = [
    "DB_NAME",
    "Event",
    "Hold",
    "Intent",
    "SqliteStore",
    "Store",
    "StoreNotice",
    "StoredState",
    "check_state_dir",
    "default_state_dir",
    "open_store",
]
