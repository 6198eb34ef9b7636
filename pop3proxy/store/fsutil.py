"""Durable writes: the one place that creates, fsyncs and renames files of the cache."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | Iterable[bytes]) -> None:
    for chunk in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def create_file(path: Path, data: bytes | Iterable[bytes], mode: int = FILE_MODE) -> int:
    """Create `path` (which must not exist) with `data` (bytes or an iterable of chunks), mode 0600, and
    return its open descriptor, not fsync'ed yet (`make_durable`). A failure removes the partial file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        # A partial file (a full disk) must not keep the space it took.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _writeback_starter() -> Callable[[int], object] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a file's data out without waiting."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return lambda fd: function(fd, 0, 0, 2)  # 2: SYNC_FILE_RANGE_WRITE


_START_WRITEBACK = _writeback_starter()


def make_durable(fds: Sequence[int]) -> None:
    """fsync each file. With several, all their data is sent to the disk first (a hint; where the system
    has no such call, only the fsyncs), so that each fsync waits for its own journal commit only, not for
    its data too: the batch's flushes overlap."""
    if len(fds) > 1 and _START_WRITEBACK is not None:
        for fd in fds:
            _START_WRITEBACK(fd)
    for fd in fds:
        os.fsync(fd)


def write_new_file(
    path: Path, data: bytes | Iterable[bytes], durable: bool = True, mode: int = FILE_MODE
) -> None:
    """Create `path` (which must not exist) with `data` (bytes or an iterable of chunks), mode 0600;
    fsync'ed unless `durable` is False. A failure removes the partial file."""
    fd = create_file(path, data, mode)
    try:
        if durable:
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes | Iterable[bytes], mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` durably: write a temporary file in the same directory, fsync it,
    rename it over `path`, fsync the directory. A reader sees the old or the new file, never a part;
    a failure leaves the old file and no temporary one. The new file has `mode` (0600 by default)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(6)}")
    write_new_file(tmp, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
