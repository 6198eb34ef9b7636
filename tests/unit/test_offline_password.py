"""The one offline password check (POP3, the web console's sign-in and the SMTP relay all call it)."""

from __future__ import annotations

from pathlib import Path

from pop3proxy.proxy.credentials import hash_password
from pop3proxy.proxy.offline import OFFLINE_HASH, check_offline_password
from pop3proxy.store.api import local_stores
from pop3proxy.store.paths import user_dir
from pop3proxy.store.state import UserState

CHEAP = {"n": 2**4, "r": 8, "p": 1}  # the stored parameters are used for the check: keep the test fast


def keep(root: Path, cache_id: str, **meta: str) -> Path:
    directory = user_dir(root, cache_id)
    directory.mkdir(parents=True)
    with UserState(directory / "state.db") as state:
        for key, value in meta.items():
            state.set_meta(key, value)
    return directory


def test_the_right_password_matches(tmp_path):
    keep(tmp_path, "alice@example.org", **{OFFLINE_HASH: hash_password("correct horse", **CHEAP)})
    assert check_offline_password(local_stores(tmp_path).states, "alice@example.org", "correct horse") is True


def test_a_wrong_password_does_not(tmp_path):
    keep(tmp_path, "alice@example.org", **{OFFLINE_HASH: hash_password("correct horse", **CHEAP)})
    assert check_offline_password(local_stores(tmp_path).states, "alice@example.org", "Correct horse") is False
    assert check_offline_password(local_stores(tmp_path).states, "alice@example.org", "") is False


def test_a_malformed_hash_never_matches(tmp_path):
    keep(tmp_path, "alice@example.org", **{OFFLINE_HASH: "$scrypt$x"})
    assert check_offline_password(local_stores(tmp_path).states, "alice@example.org", "$scrypt$x") is False


def test_no_hash_kept_is_none(tmp_path):
    keep(tmp_path, "alice@example.org", user="alice@example.org")
    assert check_offline_password(local_stores(tmp_path).states, "alice@example.org", "correct horse") is None


def test_no_state_file_is_none_and_creates_nothing(tmp_path):
    assert check_offline_password(local_stores(tmp_path).states, "bob@example.org", "correct horse") is None
    assert list(tmp_path.iterdir()) == []
    user_dir(tmp_path, "bob@example.org").mkdir()  # a cache directory without a state database
    assert check_offline_password(local_stores(tmp_path).states, "bob@example.org", "correct horse") is None
    assert list(user_dir(tmp_path, "bob@example.org").iterdir()) == []


def test_another_accounts_hash_is_not_used(tmp_path):
    keep(tmp_path, "alice@example.org", **{OFFLINE_HASH: hash_password("correct horse", **CHEAP)})
    assert check_offline_password(local_stores(tmp_path).states, "bob@example.org", "correct horse") is None
