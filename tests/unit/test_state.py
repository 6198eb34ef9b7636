"""Tests for pop3proxy.store.state: file modes, transient errors versus corruption, the journal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pop3proxy.store.state import UserState


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_state_files_hold_the_offline_hash_and_are_private(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = tmp_path / "state.db"
        with UserState(path) as state:
            state.set_meta("offline_hash", "$scrypt$secret")
            files = [path, tmp_path / "state.journal", tmp_path / "state.db-wal", tmp_path / "state.db-shm"]
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(previous)


def test_state_files_of_an_older_version_are_made_private(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with UserState(path) as state:
        state.set_meta("offline_hash", "$scrypt$secret")
    for name in ("state.db", "state.journal"):
        os.chmod(tmp_path / name, 0o644)
    with UserState(path):
        assert mode(path) == mode(tmp_path / "state.journal") == 0o600
