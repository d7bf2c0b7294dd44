"""Reading a file the operator wrote into text, refusing what cannot be one.

Everything here fails with located diagnostics, never an exception trace: a
missing or unreadable file, a file over the size limit (read no further than
the limit, so a huge file costs nothing), bytes that are not UTF-8 (UTF-8 and
UTF-16 byte order marks are honoured), and control characters that mark a
binary file. Positions of bad bytes are given as line and column.
"""

from __future__ import annotations

import codecs
import os
import re

from reconciler.errors import Diagnostic, InputError

PROFILE_SIZE_LIMIT = 1 << 20  # 1 MiB: the largest real profile is a few KiB
SNAPSHOT_SIZE_LIMIT = 8 << 20  # 8 MiB: a snapshot lists processes, leases and demands

# YAML forbids C0 controls other than tab, LF and CR, DEL, C1 controls other than NEL, and surrogates.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def read_bytes(path: str | os.PathLike[str], limit: int) -> bytes:
    name = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
            if len(data) > limit:
                size = os.fstat(handle.fileno()).st_size
                raise InputError([_at_start(name, f"file too large ({size} bytes, limit {limit} bytes)")])
    except FileNotFoundError:
        raise InputError([_at_start(name, "cannot read file: no such file")]) from None
    except IsADirectoryError:
        raise InputError([_at_start(name, "cannot read file: it is a directory; give a file path")]) from None
    except PermissionError:
        raise InputError([_at_start(name, "cannot read file: permission denied")]) from None
    except OSError as exc:
        raise InputError([_at_start(name, f"cannot read file: {exc.strerror or exc}")]) from None
    return data


def decode(data: bytes | str, filename: str, limit: int) -> str:
    """Text of ``data``, checked for size, encoding and binary content."""
    if isinstance(data, str):
        text = data
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise InputError([_at_start(filename, f"file too large ({size} bytes, limit {limit} bytes)")])
    else:
        if len(data) > limit:
            raise InputError([_at_start(filename, f"file too large ({len(data)} bytes, limit {limit} bytes)")])
        text = _decode_bytes(data, filename)
    text = text.removeprefix("\ufeff")
    bad = _FORBIDDEN.search(text)
    if bad:
        line, col = _line_col(text, bad.start())
        char = f"U+{ord(bad.group()):04X}"
        raise InputError(
            [Diagnostic(filename, line, col,
                        f"control character {char} is not allowed in YAML; is this a binary file?")]
        )
    return text


def _decode_bytes(data: bytes, filename: str) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise InputError([_at_start(filename, "not valid UTF-16 text despite its byte order mark")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start].decode("utf-8", "replace")
        line, col = _line_col(prefix, len(prefix))
        raise InputError(
            [
                Diagnostic(
                    filename,
                    line,
                    col,
                    f"not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                    "save the file as UTF-8",
                )
            ]
        ) from None


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


def _at_start(filename: str, message: str) -> Diagnostic:
    return Diagnostic(filename, 1, 1, message)
