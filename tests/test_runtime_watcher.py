"""The profile watcher: re-read on change, yield only new content, keep errors located.

Logic tests drive the watcher with hand-made change batches and resync ticks
(no timing); the file-system tests save a real file the ways editors do (in
place, atomic rename, vim-style) and wait, bounded, for the one change each.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.loading import load_profile
from reconciler.loading.watcher import (
    ProfileChange,
    ProfileDirectory,
    ProfileFile,
    ProfileWatcher,
    Resync,
    choose_profile,
)
from reconciler.testing.clock import SteppedClock

PROFILES = Path(__file__).resolve().parent.parent / "profiles"

GOOD = """\
schema_version: 1
name: t
vram_total_mb: 8192
services:
  a: {max_mb: 100, priority: {priority}}
"""
BAD = """\
schema_version: 1
name: t
vram_total_mb: 8192
services:
  a: {max_mb: 100, priorty: 1}
"""


def good(priority: int = 1) -> str:
    return GOOD.replace("{priority}", str(priority))


class Manual:
    """A hand-driven stream of change batches or ticks."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()

    def push(self) -> None:
        self.queue.put_nowait(object())

    def __call__(self) -> AsyncIterator[object]:
        async def stream() -> AsyncIterator[object]:
            while True:
                yield await self.queue.get()

        return stream()


class Collected:
    """The watcher's events, gathered by a background task into a queue."""

    def __init__(self, watcher: ProfileWatcher) -> None:
        self.watcher = watcher
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for event in self.watcher.events():
            self.queue.put_nowait(event)
        self.queue.put_nowait(StopAsyncIteration)

    async def next(self, timeout_s: float = 2.0) -> object:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    async def nothing_within(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return self.queue.empty()

    async def close(self) -> None:
        self.watcher.stop()
        await asyncio.wait_for(self.task, 5)


def test_profile_file_reads_profile_or_located_diagnostics(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(good())
    change = ProfileFile(path).read()
    assert change.ok and change.profile.services["a"].priority == 1 and change.path == path
    path.write_text(BAD)
    bad = ProfileFile(path).read()
    assert bad.profile is None and bad.digest != change.digest
    assert [str(d) for d in bad.diagnostics] == [
        f"{path}:5:20: unknown key 'priorty' in services.a; did you mean 'priority'?"
    ]
    path.unlink()
    assert ProfileFile(path).read().missing


def test_changes_only_when_content_differs(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(good(1))

    async def main() -> None:
        batches, ticks = Manual(), Manual()
        watcher = ProfileWatcher(ProfileFile(path), batches=batches, ticks=ticks, clock=SYSTEM_CLOCK)
        assert watcher.load().ok
        events = Collected(watcher)
        batches.push()  # a touch: same bytes
        assert await events.nothing_within(0.1)
        path.write_text(good(2))
        batches.push()
        change = await events.next()
        assert isinstance(change, ProfileChange) and change.profile.services["a"].priority == 2
        path.write_text(BAD)
        batches.push()
        rejected = await events.next()
        assert rejected.profile is None and rejected.diagnostics and rejected.diagnostics[0].line == 5
        batches.push()  # saved again, still the same bad content: reported once
        path.write_text(good(2))  # back to the last good content: the error is gone, say so
        batches.push()
        fixed = await events.next()
        assert fixed.ok and fixed.profile.services["a"].priority == 2
        await events.close()

    asyncio.run(main())


def test_resync_tick_rereads_and_ticks(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(good(1))

    async def main() -> None:
        batches, ticks = Manual(), Manual()
        watcher = ProfileWatcher(ProfileFile(path), batches=batches, ticks=ticks, clock=SYSTEM_CLOCK)
        watcher.load()
        events = Collected(watcher)
        ticks.push()
        assert isinstance(await events.next(), Resync)
        path.write_text(good(3))  # an edit whose event was missed
        ticks.push()
        change = await events.next()
        assert isinstance(change, ProfileChange) and change.profile.services["a"].priority == 3
        assert isinstance(await events.next(), Resync)
        await events.close()

    asyncio.run(main())


def test_missing_file_settles_before_it_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(good(1))

    async def main() -> None:
        batches, ticks, clock = Manual(), Manual(), SteppedClock()
        watcher = ProfileWatcher(ProfileFile(path), batches=batches, ticks=ticks, settle_s=2.0, clock=clock)
        watcher.load()
        events = Collected(watcher)
        path.unlink()  # vim: the original renamed away, the new one not written yet
        batches.push()
        await clock.sleeping(2.0)  # the settle window is open: nothing is reported meanwhile
        assert await events.nothing_within(0.05)
        path.write_text(good(2))
        batches.push()
        change = await events.next()
        assert change.ok and change.profile.services["a"].priority == 2
        path.unlink()  # really gone: reported after settle_s
        batches.push()
        await clock.sleeping(2.0)
        assert await events.nothing_within(0.05)
        clock.advance(2.0)
        gone = await events.next(10)
        assert gone.missing and "no such file" in str(gone.diagnostics[0])
        await events.close()

    asyncio.run(main())


def test_an_edit_before_the_watch_starts_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(good(1))

    async def main() -> None:
        watcher = ProfileWatcher(ProfileFile(path), batches=Manual(), ticks=Manual(), clock=SYSTEM_CLOCK)
        watcher.load()
        path.write_text(good(5))
        events = Collected(watcher)
        change = await events.next()
        assert change.profile.services["a"].priority == 5
        await events.close()

    asyncio.run(main())


def _save_in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _save_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_vim(path: Path, text: str) -> None:
    backup = path.with_name(path.name + "~")
    (path.parent / "4913").write_text("")  # vim's probe file
    (path.parent / "4913").unlink()
    os.replace(path, backup)
    path.write_text(text)
    backup.unlink()


@pytest.mark.parametrize("save", [_save_in_place, _save_atomic, _save_vim], ids=["in-place", "rename", "vim"])
def test_real_saves_are_seen_once(tmp_path: Path, save) -> None:
    path = tmp_path / "profile.yaml"
    latency: list[float] = []
    path.write_text(good(1))

    async def main() -> None:
        watcher = ProfileWatcher(ProfileFile(path), resync_s=3600, clock=SYSTEM_CLOCK)
        watcher.load()
        events = Collected(watcher)
        await asyncio.sleep(0.05)
        for priority in (2, 3):
            saved = time.monotonic()
            save(path, good(priority))
            change = await events.next(5)
            latency.append(time.monotonic() - saved)
            assert isinstance(change, ProfileChange) and change.ok
            assert change.profile.services["a"].priority == priority
        save(path, good(3))  # same content again: nothing
        assert await events.nothing_within(0.3)
        watcher.stop()
        assert await events.next(5) is StopAsyncIteration

    asyncio.run(main())
    assert min(latency) < 0.5, latency  # debounce 50 ms; the target is well under 200 ms


def test_a_burst_of_writes_is_one_change(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(good(1))
    (tmp_path / "other.txt").write_text("x")

    async def main() -> None:
        watcher = ProfileWatcher(ProfileFile(path), resync_s=3600, clock=SYSTEM_CLOCK)
        watcher.load()
        events = Collected(watcher)
        await asyncio.sleep(0.05)
        (tmp_path / "other.txt").write_text("y")  # not the profile: ignored
        text = good(4)
        with open(path, "w") as f:  # a slow editor: several partial writes
            for i in range(0, len(text), 16):
                f.write(text[i : i + 16])
                f.flush()
                await asyncio.sleep(0.005)
        change = await events.next(5)
        assert change.ok and change.profile.services["a"].priority == 4
        assert await events.nothing_within(0.3)
        await events.close()

    asyncio.run(main())


def _bundled() -> list[tuple[Path, object]]:
    return [(p, load_profile(p)) for p in sorted(PROFILES.glob("*.yaml"))]


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (8192, "single-gpu-8gb"),
        (24564, "single-gpu-24gb"),  # an RTX 4090 reports a little under 24576
        (15360, "single-gpu-16gb"),  # a T4 reports 15360 MiB for 16 GB
        (12288, "single-gpu-8gb"),
        (81920, "single-gpu-24gb"),
        (6144, "single-gpu-6gb"),
        (4096, "cpu"),  # smaller than every GPU profile
        (None, "cpu"),  # no GPU
    ],
)
def test_choose_profile_by_gpu_size(total: int | None, expected: str) -> None:
    chosen = choose_profile(_bundled(), total)
    assert not isinstance(chosen, str)
    assert chosen[1].name == expected


def test_choose_profile_without_a_cpu_profile_says_why() -> None:
    gpu_only = [c for c in _bundled() if c[1].vram_total_mb is not None]
    assert "no CPU profile" in choose_profile(gpu_only, None)
    assert "no profile fits a GPU of 2048 MB" in choose_profile(gpu_only, 2048)


def test_profile_directory_redetects_and_blocks_on_invalid_files(tmp_path: Path) -> None:
    total: list[int | None] = [8192]
    source = ProfileDirectory(tmp_path, lambda: total[0])
    (tmp_path / "small.yaml").write_text(good().replace("8192", "4096").replace("name: t", "name: small"))
    (tmp_path / "notes.txt").write_text("not a profile")
    first = source.read()
    assert first.ok and first.profile.name == "small" and "4096 MB profile small.yaml" in first.note
    (tmp_path / "big.yaml").write_text(good().replace("name: t", "name: big"))
    assert source.read().profile.name == "big"
    total[0] = None
    no_gpu = source.read()
    assert no_gpu.profile is None and "no CPU profile" in no_gpu.diagnostics[0].message
    total[0] = 8192
    (tmp_path / "broken.yml").write_text(BAD)
    blocked = source.read()
    assert blocked.profile is None and blocked.diagnostics[0].file == str(tmp_path / "broken.yml")
    assert source.relevant("/x/broken.yml") and not source.relevant("/x/.hidden.yaml")


def test_unchanged_bytes_are_not_parsed_again(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(good(1))

    class Counting(ProfileFile):
        reads = 0

        def read(self) -> ProfileChange:
            Counting.reads += 1
            return super().read()

    async def main() -> None:
        batches, ticks = Manual(), Manual()
        watcher = ProfileWatcher(Counting(path), batches=batches, ticks=ticks, clock=SYSTEM_CLOCK)
        watcher.load()
        events = Collected(watcher)
        for _ in range(3):
            batches.push()
            ticks.push()
        assert isinstance(await events.next(), Resync)
        path.write_text(good(2))
        batches.push()
        assert (await events.next()).profile.services["a"].priority == 2
        await events.close()

    asyncio.run(main())
    assert Counting.reads == 2  # load() and the one real change


def test_profile_directory_waits_for_the_chosen_file_during_a_save(tmp_path: Path) -> None:
    """A vim-style save cut in two batches never switches to another profile (invariant 2)."""
    big, small = tmp_path / "big.yaml", tmp_path / "small.yaml"
    big.write_text(good(1).replace("name: t", "name: big"))
    small.write_text(good(1).replace("8192", "4096").replace("name: t", "name: small"))

    async def main() -> None:
        clock = SteppedClock()
        watcher = ProfileWatcher(ProfileDirectory(tmp_path, lambda: 8192), resync_s=3600, settle_s=2.0, clock=clock)
        assert watcher.load().profile.name == "big"
        events = Collected(watcher)
        await asyncio.sleep(0.05)
        backup = tmp_path / "big.yaml~"
        os.replace(big, backup)  # vim: the original renamed away ...
        await clock.sleeping(2.0)  # ... the batch is cut here: the settle window is open
        big.write_text(good(2).replace("name: t", "name: big"))  # ... the new one written
        backup.unlink()
        change = await events.next(5)
        assert change.ok and change.profile.name == "big" and change.profile.services["a"].priority == 2
        assert await events.nothing_within(0.3)
        big.unlink()  # really gone: detected again after the settle window
        await clock.sleeping(2.0)
        clock.advance(2.0)
        change = await events.next(10)
        assert change.ok and change.profile.name == "small"
        await events.close()

    asyncio.run(main())
