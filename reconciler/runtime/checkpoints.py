"""Checkpoints: the store's write-ahead log copied back into its file, on a thread, never on a request.

The store runs SQLite in WAL mode with automatic checkpoints off
(:mod:`reconciler.store.sqlite`): a commit only appends to ``state.db-wal``,
and copying the log back into ``state.db`` — two ``fdatasync`` calls, the
slow part of SQLite — is left to this task. Every :data:`EVERY_S` it runs
a ``PASSIVE`` checkpoint on a connection of its own, in a worker thread:
writers are not blocked (a passive checkpoint copies what no reader still
needs and returns), and the event loop never waits for the disk. When the
reconciler stops, one last checkpoint truncates the log. A checkpoint that
fails (the disk is full) is logged and tried again next time: the log
keeps growing meanwhile, nothing is lost.

A log nobody wrote to since the last checkpoint (its size and modification
time as they were then: an idle reconciler's) is not checkpointed again: that
was a thread woken, a connection opened and a checkpoint run every 2 s for
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from reconciler.core.clock import Clock
from reconciler.errors import StoreError
from reconciler.store.sqlite import SqliteStore

EVERY_S = 2.0

log = logging.getLogger("reconciler.checkpoints")


class Checkpoints:
    """The background checkpoints of one store: :meth:`start` in the event loop, :meth:`stop` at the end."""

    def __init__(self, store: SqliteStore, clock: Clock, every_s: float = EVERY_S):
        self.store = store
        self.clock = clock
        self.every_s = every_s
        self.done = 0  # checkpoints run (for tests and curiosity)
        self._task: asyncio.Task[None] | None = None
        self._seen: tuple[int, int] | None = None  # the log's (size, mtime) right after the last checkpoint

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._once(truncate=True)

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(self.every_s)
            if self._seen is None or self._log() != self._seen:
                await self._once()

    def _log(self) -> tuple[int, int] | None:
        """The write-ahead log's size and modification time (None when there is none)."""
        try:
            stat = os.stat(f"{self.store.path}-wal")
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns

    async def _once(self, *, truncate: bool = False) -> None:
        try:
            await asyncio.to_thread(self.store.checkpoint, truncate=truncate)
            self.done += 1
            self._seen = self._log()
        except StoreError as exc:
            log.warning("checkpoint of %s failed (%s); the next one tries again", self.store.path, exc)
        except RuntimeError:  # the loop is closing (no thread can be started): the next start checkpoints
            with contextlib.suppress(StoreError):
                self.store.checkpoint(truncate=truncate)
