"""The write-ahead log is copied back into the file by a background task, never by a commit."""

from __future__ import annotations

import asyncio
import os

from reconciler.core.snapshot import Lease
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.runtime.checkpoints import Checkpoints
from reconciler.store.sqlite import SqliteStore


def test_commits_grow_the_log_and_the_background_checkpoints_copy_it_back(tmp_path):
    store = SqliteStore(tmp_path / "state.db", SYSTEM_CLOCK)
    wal = tmp_path / "state.db-wal"
    try:
        for n in range(300):  # no commit checkpoints: automatic checkpoints are off
            store.put_lease(Lease(id=f"l{n}", service="svc", holder="h"))
        grown = os.path.getsize(wal)
        assert grown > 100_000

        async def main() -> int:
            checkpoints = Checkpoints(store, SYSTEM_CLOCK, every_s=0.01)
            checkpoints.start()
            while checkpoints.done < 1:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # ten more periods, nothing written: the same log is not checkpointed again
            assert checkpoints.done == 1
            store.put_lease(Lease(id="after", service="svc", holder="h"))  # the store is usable meanwhile
            while checkpoints.done < 2:  # a write: the next period checkpoints
                await asyncio.sleep(0.01)
            await checkpoints.stop()  # the last one truncates the log
            return checkpoints.done

        assert asyncio.run(main()) >= 3
        assert os.path.getsize(wal) == 0
        assert len(store.leases()) == 301
    finally:
        store.close()
    reopened = SqliteStore(tmp_path / "state.db", SYSTEM_CLOCK)
    try:
        assert len(reopened.leases()) == 301  # all of it in the file
    finally:
        reopened.close()
