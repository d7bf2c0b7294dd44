"""One reconciler at a time per state directory: an exclusive ``flock``.

Two runtimes acting on one inventory would race (both could start the same
service). The lock file holds the holder's pid, for the message; the lock
itself goes away with the process, however it ends. ``reconciler apply``
takes it for its run; ``reconciler watch`` holds the same file for its life.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from reconciler.errors import GuardError, StoreError

LOCK_NAME = "watch.lock"  # the name `reconciler watch` uses, so apply and watch exclude each other


class StateLock:
    def __init__(self, state_dir: Path, *, purpose: str = "reconciler"):
        self.path = Path(state_dir) / LOCK_NAME
        self.purpose = purpose
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`GuardError` naming the pid that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot open the lock file {self.path}: {exc.strerror or exc}; make it (and {self.path.parent}) "
                f"writable by uid {os.geteuid()}, or use another --state-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GuardError(
                f"another reconciler (pid {holder}) manages {self.path.parent}; {self.purpose} would race it "
                "(edit the profile it watches instead, or use another --state-dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
