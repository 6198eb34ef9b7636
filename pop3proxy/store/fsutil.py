"""Durable writes: the one place that creates, fsyncs and renames files of the cache."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, durable: bool = True) -> None:
    """Create `path` (which must not exist) with `data`, mode 0600; fsync'ed unless `durable` is False."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        # A partial file (a full disk) must not keep the space it took.
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
