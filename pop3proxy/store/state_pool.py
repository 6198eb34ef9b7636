"""Open state databases kept between an account's sessions, in each process.

Opening a state database checks it (``PRAGMA quick_check``, the schema): about half a millisecond, at
every login and every sync. A `StatePool` keeps the databases its `UserState` objects were opened on
after they are closed, and hands one out again while its file is unchanged since it was given back:
the same file (device and inode), size and modification time. Any change (another process's checkpoint,
a file moved aside, replaced, removed or damaged) makes the next open a new one, checked as before; a
database that raised an SQLite error is closed for good. At most ``limit`` are kept (the least recently
used go first), each with its descriptors (database, its WAL and shared memory, the journal).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from pop3proxy.store.state import UserState

IDLE_STATES = 64  # open state databases kept per process between sessions


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class StatePool:
    """Idle `UserState` objects by path (thread-safe: opened and closed in worker threads)."""

    def __init__(self, limit: int = IDLE_STATES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._idle: OrderedDict[Path, list[tuple[UserState, tuple | None]]] = OrderedDict()
        self._count = 0

    def open(self, path: Path) -> UserState:
        state = self._take(path, _identity(path))
        if state is None:
            state = UserState(path)
        state.home = self._give_back
        return state

    def _take(self, path: Path, identity: tuple | None) -> UserState | None:
        with self._lock:
            entries = self._idle.pop(path, [])
            alike = [entry for entry in entries if identity is not None and entry[1] == identity]
            found = alike.pop()[0] if alike else None
            if alike:
                self._idle[path] = alike
            self._count -= len(entries) - len(alike)
        for state, seen in entries:
            if state is not found and (identity is None or seen != identity):
                state.close()  # its file changed since (`home` is None: really closed)
        return found

    def _give_back(self, state: UserState) -> None:
        identity = _identity(state.path)
        evicted: list[UserState] = []
        with self._lock:
            self._idle.setdefault(state.path, []).append((state, identity))
            self._idle.move_to_end(state.path)
            self._count += 1
            while self._count > self.limit:
                path, entries = next(iter(self._idle.items()))
                evicted.append(entries.pop(0)[0])
                self._count -= 1
                if not entries:
                    del self._idle[path]
        for old in evicted:
            old.close()

    def clear(self) -> None:
        """Close every idle database (the process is stopping)."""
        with self._lock:
            entries = [state for states in self._idle.values() for state, _ in states]
            self._idle.clear()
            self._count = 0
        for state in entries:
            state.close()
