"""Watching the profile: a saved file becomes a new desired state, or located errors, fast.

:class:`ProfileWatcher` watches the profile's *directory* (not recursive;
inotify on the event loop, :mod:`.inotify`, or watchfiles elsewhere), so
every way an editor saves is seen: in place, by atomic rename (write
``x.tmp``, rename over ``profile.yaml``) and vim-style (rename the file to a
backup, write a new one, delete the backup). Events are only a hint: a
burst is coalesced (``debounce_ms`` of quiet, 30 ms by default, so that a save
reaches the first action well under 200 ms) and then the file is *re-read*;
what it holds decides, never the event type. It is parsed only when its bytes
changed (SHA-256), and a :class:`ProfileChange` is yielded only when the
outcome differs from the last one, so ``touch`` or a save without edits costs
nothing.

An invalid file yields a change with ``profile=None`` and its located
diagnostics; the caller keeps the last good profile in force (invariant 2).
A file that is briefly missing (the middle of a rename) is re-read once the
directory settles; one that stays missing is reported like any invalid file.
Every ``resync_s`` seconds the watcher re-reads the file anyway (a missed
event, a network file system) and yields :class:`Resync`, so the caller
observes and plans again even when nothing was edited. The settle window and
the resync timer run on the injected :class:`~reconciler.core.clock.Clock`,
so tests move them by hand.

Two sources of profiles:

- :class:`ProfileFile` (``--profile FILE``): that file. When it is a symlink,
  the directories of the link and of its target are both watched.
- :class:`ProfileDirectory` (``--profiles DIR``): auto-detection among the
  ``*.yaml``/``*.yml`` files of DIR (hidden files aside), redone on every change
  there. The GPU size is the *smallest* GPU's ``total_mb`` (the first one on the
  usual host of identical GPUs; on a mixed host, the size every service can be
  placed on). The largest profile whose ``vram_total_mb`` fits is chosen — it
  fits when the GPU reports at least :data:`FIT_RATIO` of it, because NVML
  reports less than the nominal size (a 16 GB T4 shows 15360 MiB, a 24 GB RTX
  4090 24564 MiB); ties go to the file name. With no GPU, or a GPU smaller than
  every GPU profile, the CPU profile (no ``vram_total_mb``) is chosen. An
  invalid file anywhere in DIR blocks detection (its diagnostics are yielded
  and the last good profile stays), since choosing among the valid rest could
  switch the host because of a broken edit. When the file last chosen
  disappears (the middle of a vim-style save), it gets the same settle window
  as a missing ``--profile`` file to come back; only if it stays gone is the
  profile detected again among the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from watchfiles import awatch

from reconciler.core.clock import Clock
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Gpu
from reconciler.errors import Diagnostic, ProfileError
from reconciler.loading import inotify
from reconciler.loading.profiles import load_profile

DEBOUNCE_MS = 30
MAX_BATCH_MS = 500  # a stream of writes is still cut into batches this long
RESYNC_S = 30.0
SETTLE_S = 0.3  # how long a missing file may stay missing before it is reported
FIT_RATIO = 0.9
PROFILE_SUFFIXES = (".yaml", ".yml")
_MISSING = "cannot read file: no such file"

Batches = Callable[[], AsyncIterator[object]]
"""A factory of raw change batches (the contents do not matter, only that something changed)."""


@dataclass(frozen=True)
class ProfileChange:
    """What the profile source holds now: a profile, or the reasons it has none."""

    profile: Profile | None
    diagnostics: tuple[Diagnostic, ...] = ()
    path: Path | None = None  # the file the profile came from (the chosen one, with --profiles)
    digest: str = ""
    note: str = ""  # how it was chosen, with --profiles

    @property
    def ok(self) -> bool:
        return self.profile is not None

    @property
    def missing(self) -> bool:
        return self.profile is None and any(d.message == _MISSING for d in self.diagnostics)


@dataclass(frozen=True)
class Resync:
    """The periodic tick: observe and plan again though nothing was edited."""


WatchEvent = ProfileChange | Resync


class ProfileSource(Protocol):
    """Where profiles come from: the directories to watch, which names matter, how to read.

    ``fingerprint()`` is cheap (bytes, no parsing): while it is unchanged,
    ``read()`` — which parses and validates — is not called again.
    """

    def directories(self) -> list[Path]: ...
    def relevant(self, path: str) -> bool: ...
    def fingerprint(self) -> str: ...
    def read(self) -> ProfileChange: ...
    def stayed_missing(self) -> ProfileChange | None: ...


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _load(path: Path, environ: Mapping[str, str] | None) -> tuple[Profile | None, tuple[Diagnostic, ...]]:
    try:
        return load_profile(path, environ), ()
    except ProfileError as exc:
        return None, tuple(exc.diagnostics)


class ProfileFile:
    """One profile file (``--profile FILE``)."""

    def __init__(self, path: str | os.PathLike[str], environ: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.environ = environ

    def directories(self) -> list[Path]:
        dirs = [self.path.absolute().parent]
        target = self.path.resolve().parent
        return dirs if target in dirs else [*dirs, target]

    def relevant(self, path: str) -> bool:
        return Path(path).name in {self.path.name, self.path.resolve().name}

    def fingerprint(self) -> str:
        data = _read_bytes(self.path)
        return _digest(data) if data is not None else "missing"

    def read(self) -> ProfileChange:
        data = _read_bytes(self.path)
        profile, diagnostics = _load(self.path, self.environ)
        digest = _digest(data) if data is not None else "missing"
        return ProfileChange(profile, diagnostics, self.path, digest)

    def stayed_missing(self) -> ProfileChange | None:
        """The file stayed missing through the settle window: it is reported as it is."""
        return None


class ProfileDirectory:
    """Auto-detection among the profiles of a directory (``--profiles DIR``)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        gpu_total_mb: Callable[[], int | None],
        environ: Mapping[str, str] | None = None,
    ):
        self.directory = Path(directory)
        self.gpu_total_mb = gpu_total_mb
        self.environ = environ
        self._chosen: Path | None = None  # the file last chosen

    def directories(self) -> list[Path]:
        return [self.directory.absolute()]

    def relevant(self, path: str) -> bool:
        name = Path(path).name
        return name.endswith(PROFILE_SUFFIXES) and not name.startswith(".")

    def fingerprint(self) -> str:
        try:
            files = self.files()
        except ProfileError:
            return "unlistable"
        parts = [str(self.gpu_total_mb()).encode()]
        for path in files:
            parts += [path.name.encode(), _read_bytes(path) or b""]
        return _digest(*parts)

    def files(self) -> list[Path]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as exc:
            raise ProfileError(
                [Diagnostic(str(self.directory), 1, 1, f"cannot list profiles: {exc.strerror or exc}")]
            ) from exc
        return [p for p in entries if self.relevant(p.name) and p.is_file()]

    def read(self) -> ProfileChange:
        if self._chosen is not None and not self._chosen.is_file():
            # The middle of a save (vim renames the file away, then writes a new one): reported as
            # missing, so the watcher waits for it to come back instead of choosing another profile.
            diagnostic = Diagnostic(str(self._chosen), 1, 1, _MISSING)
            return ProfileChange(None, (diagnostic,), self._chosen, _digest(b"missing", str(self._chosen).encode()))
        try:
            files = self.files()
        except ProfileError as exc:
            return ProfileChange(None, tuple(exc.diagnostics), None, "unlistable")
        loaded: list[tuple[Path, Profile]] = []
        problems: list[Diagnostic] = []
        for path in files:
            profile, diagnostics = _load(path, self.environ)
            if profile is None:
                problems.extend(diagnostics)
            else:
                loaded.append((path, profile))
        if problems:
            return ProfileChange(None, tuple(problems), None, _digest(*(str(d).encode() for d in problems)))
        total = self.gpu_total_mb()
        chosen = choose_profile(loaded, total)
        if isinstance(chosen, str):
            diagnostic = Diagnostic(str(self.directory), 1, 1, chosen)
            return ProfileChange(None, (diagnostic,), None, _digest(chosen.encode()))
        path, profile, note = chosen
        self._chosen = path
        data = _read_bytes(path) or b""
        return ProfileChange(profile, (), path, _digest(str(path).encode(), data), note)

    def stayed_missing(self) -> ProfileChange | None:
        """The chosen file stayed missing through the settle window: detect again among the rest."""
        self._chosen = None
        return self.read()


def fits(profile: Profile, gpu_total_mb: int) -> bool:
    """Whether a GPU profile suits a GPU reporting ``gpu_total_mb`` (see :data:`FIT_RATIO`)."""
    return profile.vram_total_mb is not None and gpu_total_mb >= FIT_RATIO * profile.vram_total_mb


def choose_profile(
    candidates: list[tuple[Path, Profile]], gpu_total_mb: int | None
) -> tuple[Path, Profile, str] | str:
    """The profile for a host whose smallest GPU has ``gpu_total_mb`` (None: no GPU), or why none."""
    ordered = sorted(candidates, key=lambda c: c[0].name)
    cpu = [c for c in ordered if c[1].vram_total_mb is None]
    if gpu_total_mb is not None:
        fitting = [c for c in ordered if fits(c[1], gpu_total_mb)]
        if fitting:
            best = max(c[1].vram_total_mb or 0 for c in fitting)
            path, profile = next(c for c in fitting if c[1].vram_total_mb == best)
            return path, profile, f"GPU of {gpu_total_mb} MB: {profile.vram_total_mb} MB profile {path.name}"
        if cpu:
            why = f"GPU of {gpu_total_mb} MB is smaller than every GPU profile: CPU profile {cpu[0][0].name}"
            return cpu[0][0], cpu[0][1], why
        sizes = ", ".join(str(c[1].vram_total_mb) for c in ordered) or "none"
        return f"no profile fits a GPU of {gpu_total_mb} MB (profiles for {sizes} MB) and there is no CPU profile"
    if cpu:
        return cpu[0][0], cpu[0][1], f"no GPU: CPU profile {cpu[0][0].name}"
    return "no GPU found and no CPU profile (one without vram_total_mb) in the directory"


def smallest_gpu_total(read_gpus: Callable[[], list[Gpu]]) -> Callable[[], int | None]:
    """``gpu_total_mb`` for :class:`ProfileDirectory` from a GPU backend's ``read``."""

    def total() -> int | None:
        gpus = read_gpus()
        return min(g.total_mb for g in gpus) if gpus else None

    return total


class ProfileWatcher:
    """Yields :class:`ProfileChange` when the source's content changes, and :class:`Resync` ticks.

    ``batches`` and ``ticks`` replace the file system watch and the resync
    timer (tests drive them by hand); by default they are inotify on the
    source's directories (:mod:`.inotify`; watchfiles where that is not
    available) and a ``resync_s`` timer.
    """

    def __init__(
        self,
        source: ProfileSource,
        *,
        clock: Clock,
        debounce_ms: int = DEBOUNCE_MS,
        resync_s: float = RESYNC_S,
        settle_s: float = SETTLE_S,
        batches: Batches | None = None,
        ticks: Batches | None = None,
    ):
        self.source = source
        self.clock = clock
        self.debounce_ms = debounce_ms
        self.resync_s = resync_s
        self.settle_s = settle_s
        self._batches = batches or self._watch
        self._ticks = ticks or self._timer
        self._last: str | None = None  # digest of the last outcome yielded (or loaded)
        self._seen: str | None = None  # fingerprint of the source when it was last read
        self._stop = asyncio.Event()

    def load(self) -> ProfileChange:
        """Read the source now (start-up); later changes are relative to this."""
        self._seen = self.source.fingerprint()
        change = self.source.read()
        self._last = change.digest
        return change

    def check(self) -> ProfileChange | None:
        """Re-read the source; the change when its content differs from what was last seen."""
        change = self._read()
        if change is None or change.digest == self._last:
            return None
        self._last = change.digest
        return change

    def _read(self) -> ProfileChange | None:
        """The source's content, parsed; None when its fingerprint has not changed since the last read."""
        fingerprint = self.source.fingerprint()
        if fingerprint == self._seen:
            return None
        self._seen = fingerprint
        return self.source.read()

    def stop(self) -> None:
        self._stop.set()

    async def events(self) -> AsyncIterator[WatchEvent]:
        """Changes and resync ticks until :meth:`stop`; start iterating before acting on ``load()``."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        pumps = [
            asyncio.create_task(self._pump(self._batches(), "change", queue)),
            asyncio.create_task(self._pump(self._ticks(), "tick", queue)),
        ]
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.sleep(0)  # the pumps run until they block: the watch is set up
            if change := await self._settled(queue, set()):  # edited between load() and the watch
                yield change
            while not self._stop.is_set():
                getting = asyncio.create_task(queue.get())
                running = {p for p in pumps if not p.done()}
                await asyncio.wait({getting, stopping, *running}, return_when=asyncio.FIRST_COMPLETED)
                for pump in running:
                    if pump.done() and (error := pump.exception()) is not None:
                        getting.cancel()
                        raise error
                if not getting.done():
                    getting.cancel()
                    continue
                kinds = {getting.result()}
                while not queue.empty():
                    kinds.add(queue.get_nowait())
                change = await self._settled(queue, kinds)
                if change is not None:
                    yield change
                if "tick" in kinds:
                    yield Resync()
        finally:
            stopping.cancel()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(stopping, *pumps, return_exceptions=True)

    async def _settled(self, queue: asyncio.Queue[str], kinds: set[str]) -> ProfileChange | None:
        """Re-read; a missing file gets ``settle_s`` for the rename in progress to finish."""
        change = self._read()
        while change is not None and change.missing and self.settle_s > 0:
            got = await self._next_within(queue, self.settle_s)
            if got is None:
                break
            kinds.add(got)
            change = self._read() or change
        if change is not None and change.missing:
            change = self.source.stayed_missing() or change
        if change is None or change.digest == self._last:
            return None
        self._last = change.digest
        return change

    async def _next_within(self, queue: asyncio.Queue[str], seconds: float) -> str | None:
        """The next raw event within ``seconds`` on the clock, or None."""
        getting = asyncio.ensure_future(queue.get())
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait({getting, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not getting.done():
                getting.cancel()
        await asyncio.gather(getting, timer, return_exceptions=True)
        if getting.done() and not getting.cancelled():
            return getting.result()
        return None

    @staticmethod
    async def _pump(source: AsyncIterator[object], kind: str, queue: asyncio.Queue[str]) -> None:
        async for _ in source:
            queue.put_nowait(kind)

    async def _watch(self) -> AsyncIterator[object]:
        if inotify.available():  # on the event loop: nothing runs while nothing changes (.inotify)
            async for changed in inotify.batches(self.source.directories(), self.source.relevant,
                                                 quiet_ms=self.debounce_ms, max_batch_ms=MAX_BATCH_MS):
                yield changed
            return
        async for batch in awatch(
            *self.source.directories(),
            watch_filter=lambda _change, path: self.source.relevant(path),
            debounce=MAX_BATCH_MS,
            step=self.debounce_ms,
            stop_event=self._stop,
            recursive=False,
        ):
            yield batch

    async def _timer(self) -> AsyncIterator[object]:
        while True:
            await self.clock.sleep(self.resync_s)
            yield None
