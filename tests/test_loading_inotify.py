"""inotify batches on the event loop (reconciler.loading.inotify): what the profile watcher is told, and that
nothing runs in between."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

import pytest

from reconciler.loading import inotify

pytestmark = pytest.mark.skipif(not inotify.available(), reason="inotify is Linux-only")


async def _first(directory: Path, relevant=lambda p: p.endswith(".yaml"), *, act, quiet_ms: int = 30,
                 max_batch_ms: int = 500, timeout: float = 5.0) -> set[str]:
    stream = inotify.batches([directory], relevant, quiet_ms=quiet_ms, max_batch_ms=max_batch_ms)
    getting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)  # the watch is set up
    act()
    try:
        return await asyncio.wait_for(getting, timeout)
    finally:
        await stream.aclose()


def test_a_save_by_rename_is_one_batch_naming_the_file(tmp_path):
    def save():
        (tmp_path / "p.yaml.tmp").write_text("a: 1\n")
        os.replace(tmp_path / "p.yaml.tmp", tmp_path / "p.yaml")

    batch = asyncio.run(_first(tmp_path, act=save))
    assert str(tmp_path / "p.yaml") in batch
    assert all(p.endswith(".yaml") for p in batch)


def test_irrelevant_changes_yield_nothing(tmp_path):
    async def main():
        stream = inotify.batches([tmp_path], lambda p: p.endswith(".yaml"), quiet_ms=30, max_batch_ms=500)
        getting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        (tmp_path / "notes.txt").write_text("x")
        await asyncio.sleep(0.3)
        assert not getting.done()
        (tmp_path / "p.yaml").write_text("x")
        batch = await asyncio.wait_for(getting, 5)
        await stream.aclose()
        return batch

    assert asyncio.run(main()) == {str(tmp_path / "p.yaml")}


def test_a_burst_is_one_batch(tmp_path):
    async def main():
        stream = inotify.batches([tmp_path], lambda p: True, quiet_ms=100, max_batch_ms=2000)
        getting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        for i in range(5):
            (tmp_path / f"f{i}.yaml").write_text("x")
            await asyncio.sleep(0.02)
        first = await asyncio.wait_for(getting, 5)
        later = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)
        assert not later.done(), "the burst's writes came in more than one batch"
        later.cancel()
        await asyncio.gather(later, return_exceptions=True)
        await stream.aclose()
        return first

    assert {Path(p).name for p in asyncio.run(main())} == {f"f{i}.yaml" for i in range(5)}


def test_no_thread_waits_for_changes(tmp_path):
    async def main():
        before = threading.active_count()
        stream = inotify.batches([tmp_path], lambda p: True, quiet_ms=30, max_batch_ms=500)
        getting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.1)
        assert threading.active_count() == before
        getting.cancel()
        await asyncio.gather(getting, return_exceptions=True)
        await stream.aclose()

    asyncio.run(main())


def test_a_missing_directory_is_file_not_found(tmp_path):
    async def main():
        stream = inotify.batches([tmp_path / "nope"], lambda p: True, quiet_ms=30, max_batch_ms=500)
        await anext(stream)

    with pytest.raises(FileNotFoundError):
        asyncio.run(main())


def test_the_directory_going_away_ends_the_watch(tmp_path):
    watched = tmp_path / "d"
    watched.mkdir()

    async def main():
        stream = inotify.batches([watched], lambda p: False, quiet_ms=30, max_batch_ms=500)
        getting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        shutil.rmtree(watched)
        await asyncio.wait_for(getting, 5)

    with pytest.raises(FileNotFoundError):
        asyncio.run(main())
