"""Invariant 4 under concurrency: two stores on one file, many threads, never past max_concurrent."""

from __future__ import annotations

import threading

from reconciler.core.snapshot import Lease
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store

MAX = 3


def test_concurrent_grants_never_exceed_max_concurrent(tmp_path):
    stores = [open_store(tmp_path, SYSTEM_CLOCK), open_store(tmp_path, SYSTEM_CLOCK)]
    granted: list[str] = []
    errors: list[BaseException] = []
    peak: list[int] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        store = stores[n % 2]
        try:
            start.wait()
            for k in range(6):
                lease_id = f"L{n}-{k}"
                if store.grant_lease(Lease(id=lease_id, service="vllm"), MAX):
                    granted.append(lease_id)
                    peak.append(len(store.leases("vllm")))
                    if k % 2:  # give some back so later grants compete again
                        store.release_lease(lease_id)
                        granted.remove(lease_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors
        assert peak and max(peak) <= MAX
        held = stores[0].leases("vllm")
        assert len(held) == MAX
        assert sorted(lease.id for lease in held) == sorted(granted)
        assert stores[1].leases("vllm") == held
    finally:
        for s in stores:
            s.close()
