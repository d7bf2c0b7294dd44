"""Changes in a few directories, from Linux inotify, read on the event loop: no thread, no polling.

The profile watcher (:mod:`.watcher`) needs one thing from the file system:
"something in these directories changed", in batches (a save is several
events: write, close, rename). watchfiles gives that, but its Rust watcher
runs in a worker thread that wakes every ``step`` milliseconds (the 30 ms
debounce) to check for a stop request and for signals, taking the GIL each
time: about 33 wake-ups a second for as long as the daemon lives, which was a
quarter of the demo's whole idle CPU (0.27 % of a core of ~1 %).

Here the inotify descriptor is one more reader of the asyncio loop: while
nothing changes, nothing runs. A batch begins with the first event and ends
after ``quiet_ms`` without another (at most ``max_batch_ms`` after it began)
— watchfiles' debounce, to the millisecond rather than to the 30 ms step.
Events name paths (directory + name); a batch is yielded only when one of
them is ``relevant``; a queue overflow counts as relevant (something
changed, what is unknown: the watcher re-reads anyway).

The watched directory itself going away (deleted, moved, unmounted) ends the
iteration with :class:`FileNotFoundError`; the caller watches again later
(the daemon loop reports ``watch.degraded`` and retries). :func:`available`
says whether this works here (Linux, libc with inotify, not forced to poll
with ``WATCHFILES_FORCE_POLLING``); elsewhere the watcher uses watchfiles.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import struct
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

# linux/inotify.h
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED  # the watched directory itself
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)
_READ_SIZE = 64 * 1024


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def available() -> bool:
    """Whether inotify can be used here (else: watchfiles)."""
    return _LIBC is not None and "WATCHFILES_FORCE_POLLING" not in os.environ


def _watch(directories: Sequence[Path]) -> tuple[int, dict[int, str]]:
    """A non-blocking inotify descriptor watching ``directories``, and its watch descriptors' directories."""
    assert _LIBC is not None
    fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"inotify_init1: {os.strerror(code)}")
    watches: dict[int, str] = {}
    try:
        for directory in directories:
            wd = _LIBC.inotify_add_watch(fd, os.fsencode(directory), WATCHED)
            if wd < 0:
                code = ctypes.get_errno()
                kind = FileNotFoundError if code == errno.ENOENT else OSError
                raise kind(code, os.strerror(code), str(directory))
            watches[wd] = str(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd, watches


def _drain(fd: int, watches: dict[int, str]) -> tuple[list[str], bool, bool]:
    """Every event waiting on ``fd``: the paths they name, whether the queue overflowed, whether a watched
    directory went away."""
    paths: list[str] = []
    overflow = gone = False
    while True:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return paths, overflow, gone
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                overflow = True
            elif mask & GONE and not name:
                gone = True
            elif name and wd in watches:
                paths.append(os.path.join(watches[wd], os.fsdecode(name)))


async def batches(directories: Sequence[Path], relevant: Callable[[str], bool], *, quiet_ms: int,
                  max_batch_ms: int) -> AsyncIterator[set[str]]:
    """Batches of changed paths in ``directories`` (not recursive) that hold a ``relevant`` one, until cancelled
    (see the module docstring)."""
    fd, watches = _watch(directories)
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            paths, overflow, gone = _drain(fd, watches)
            deadline = loop.time() + max_batch_ms / 1000
            while not gone:
                wait = min(quiet_ms / 1000, deadline - loop.time())
                if wait <= 0:
                    break
                try:
                    await asyncio.wait_for(readable.wait(), wait)
                except TimeoutError:
                    break
                readable.clear()
                more, more_overflow, gone = _drain(fd, watches)
                paths += more
                overflow = overflow or more_overflow
            chosen = {p for p in paths if relevant(p)}
            if overflow or chosen:
                yield chosen
            if gone:
                raise FileNotFoundError(errno.ENOENT, "a watched directory went away", ", ".join(watches.values()))
    finally:
        loop.remove_reader(fd)
        os.close(fd)


__all__ = ["available", "batches"]
