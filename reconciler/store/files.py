"""The state directory and the files SQLite keeps in it, as an operator has to fix them.

SQLite's own words for a file it cannot use are few and vague — "unable to
open database file", "attempt to write a readonly database", "disk I/O
error" — and never say which file. This module looks at the directory and
at ``state.db`` and its companions (``-journal``, the rollback journal; ``-wal``
and ``-shm``, left by a database in WAL mode) the way the kernel will treat
them for this process, and says the first problem it finds in one sentence:
the path, what is wrong with it, and what to do (fix it, or use another
``--state-dir``).

Nothing here opens ``state.db`` or a companion: a process that closes *any*
descriptor of a file loses every POSIX lock it holds on it, SQLite's
included. ``stat``, ``lstat``, ``access`` and ``statvfs`` only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from reconciler.errors import StoreError

COMPANIONS = ("-journal", "-wal", "-shm")
ELSEWHERE = "or use another --state-dir"


def companion(db: Path, suffix: str) -> Path:
    return db.with_name(db.name + suffix)


def _who() -> str:
    return f"uid {os.geteuid()}"


def _mode(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}"


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def directory_problem(directory: Path) -> str | None:
    """What keeps ``directory`` from holding the store (it exists), or None."""
    try:
        st = os.stat(directory)
    except (FileNotFoundError, NotADirectoryError):  # missing: created by check_state_dir, or it says why not
        return None
    except OSError as exc:
        return f"state directory {directory} cannot be examined ({exc.strerror or exc}); {ELSEWHERE}"
    if not stat.S_ISDIR(st.st_mode):
        return (f"{directory} is not a directory: the state directory must be one; point --state-dir "
                "(or $RECONCILER_STATE_DIR) at a directory")
    if _read_only_fs(directory):
        return f"state directory {directory} is on a read-only file system; remount it read-write, {ELSEWHERE}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f"state directory {directory} is not writable by {_who()} ({_mode(st)}), and SQLite writes its "
                f"journal beside state.db; fix its permissions (chown/chmod), {ELSEWHERE}")
    return None


def check_state_dir(directory: Path) -> None:
    """Make sure ``directory`` can hold the store, creating it if missing; StoreError saying what to do."""
    problem = directory_problem(directory)
    if problem is not None:
        raise StoreError(problem)
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create state directory {directory}: {exc.strerror or exc}; create it "
                         f"(writable by {_who()}), {ELSEWHERE}") from None


def file_problem(path: Path) -> str | None:
    """What keeps SQLite from using ``path`` as a file (it exists), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path} cannot be examined ({exc.strerror or exc}); {ELSEWHERE}"
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return (f"{path} is a dangling symlink (to {os.readlink(path)}): remove it or point it at a file, "
                    f"{ELSEWHERE}")
        except OSError as exc:
            return f"{path} is a symlink that cannot be followed ({exc.strerror or exc}): remove it, {ELSEWHERE}"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory, not a file: move it away (mv {path} {path}.moved), {ELSEWHERE}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file ({stat.filemode(st.st_mode)}): move it away, {ELSEWHERE}"
    if not os.access(path, os.R_OK | os.W_OK):
        if _read_only_fs(path):
            return f"{path} is on a read-only file system; remount it read-write, {ELSEWHERE}"
        return (f"{path} is not readable and writable by {_who()} ({_mode(st)}): give it back (chown "
                f"{os.geteuid()} {path}) or make it writable (chmod u+rw {path}), {ELSEWHERE}")
    return None


def diagnose(db: Path, suffixes: tuple[str, ...] = ("", *COMPANIONS)) -> str | None:
    """The first problem with the state directory or with ``db`` and its companions, or None."""
    problem = directory_problem(db.parent)
    if problem is not None:
        return problem
    for suffix in suffixes:
        problem = file_problem(companion(db, suffix))
        if problem is not None:
            return problem
    return None
