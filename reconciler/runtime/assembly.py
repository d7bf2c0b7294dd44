"""The reconciler on one state directory, put together once: lock, store, event bus, runtime.

``apply`` (one converge) and ``watch``/``serve`` (the loop) need the same
parts, opened in the same order and closed in reverse whatever happens:

1. the state directory's lock (:mod:`.lock`): one reconciler per state
   directory, or a clear error naming the pid that has it — once the
   directory is known to be usable (a writable directory, created if
   missing; else a ``StoreError`` that says which path and what to do);
2. the store (:mod:`reconciler.store`), stamping with the injected clock;
3. the event bus, recording into the store;
4. the runtime, with the GPU backend the caller chose (a simulated one makes
   the drivers declare memory instead of using it).

:class:`Assembly` is that, as an async context manager. The GPU backend is
the caller's to open (the profile may decide its size) but is closed here,
with the runtime.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from reconciler.core.clock import Clock
from reconciler.host.gpu import GpuBackend
from reconciler.host.sim import SimBackend
from reconciler.runtime.events import EventBus
from reconciler.runtime.lock import StateLock
from reconciler.runtime.runtime import Runtime
from reconciler.store import check_state_dir, open_store
from reconciler.store.sqlite import SqliteStore

LOOP_BUSY_TIMEOUT_S = 0.1


class Assembly:
    """Lock, store, bus and runtime for ``state_dir``; ``async with Assembly(...) as parts:``."""

    def __init__(self, *, state_dir: Path, gpu_backend: GpuBackend, clock: Clock, node: str, purpose: str):
        self.state_dir = Path(state_dir)
        self.gpu_backend = gpu_backend
        self.clock = clock
        self.node = node
        self.lock = StateLock(self.state_dir, purpose=purpose)
        self._store: SqliteStore | None = None
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "enter the assembly first"
        return self._runtime

    @property
    def bus(self) -> EventBus:
        return self.runtime.events

    async def __aenter__(self) -> Assembly:
        try:
            check_state_dir(self.state_dir)
            self.lock.acquire()
        except BaseException:
            self.gpu_backend.close()  # closed here whatever happens, like the runtime's
            raise
        try:
            # a short busy timeout: another process holding the database (a sqlite3 shell mid-transaction) is a
            # store failure reported at once and retried by the next pass, never a loop (and API) frozen for it
            self._store = open_store(self.state_dir, self.clock, busy_timeout_s=LOOP_BUSY_TIMEOUT_S)
            self._runtime = Runtime(
                store=self._store, gpu_backend=self.gpu_backend, state_dir=self.state_dir, clock=self.clock,
                node=self.node, sim=isinstance(self.gpu_backend, SimBackend),
                events=EventBus(self._store, clock=self.clock),
            )
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            if self._runtime is not None:
                await self._runtime.aclose()
            else:
                self.gpu_backend.close()
        finally:
            if self._store is not None:
                self._store.close()
            self.lock.release()
