"""The file token store keeps the layout token files have always had (what every store must do is in
test_token_store_contract.py)."""

from __future__ import annotations

import json

import pytest

from pop3proxy.proxy.oauth.tokens import TokenSet, load_tokens
from pop3proxy.store.paths import encode_user
from pop3proxy.store.token_files import FileTokenStore

# A token file as pop3proxy has always written it (json.dumps(asdict(TokenSet), indent=1)).
EXISTING = """{
 "access_token": "A1",
 "refresh_token": "R1",
 "expires_at": 1060.0,
 "token_type": "Bearer",
 "scope": "openid offline_access",
 "state": "ok",
 "error": "",
 "updated": 1000.0
}"""


def test_an_existing_token_file_is_read_and_written_back_byte_for_byte(tmp_path):
    directory = tmp_path / encode_user("al/ice")
    directory.mkdir()
    (directory / "oauth2-token.json").write_text(EXISTING)
    store = FileTokenStore(tmp_path)
    tokens = load_tokens(store, "al/ice")
    assert (tokens.access_token, tokens.refresh_token, tokens.expires_at) == ("A1", "R1", 1060.0)
    store.save("al/ice", tokens.to_record())
    assert (directory / "oauth2-token.json").read_text() == EXISTING
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["al%2Fice", "oauth2-token.json"]


def test_the_files_and_their_names(tmp_path):
    store = FileTokenStore(str(tmp_path))
    store.set_local_password_hash("bob", "$scrypt$n=2,r=1,p=1$c2FsdA==$ZGlnZXN0")
    with store.renewing("bob"):
        pass
    directory = tmp_path / "bob"
    assert (directory / "local-password").read_text() == "$scrypt$n=2,r=1,p=1$c2FsdA==$ZGlnZXN0\n"
    assert sorted(p.name for p in directory.iterdir()) == ["local-password", "oauth2-token.lock"]
    assert TokenSet.from_record({"access_token": "A", "added_later": 1}) == TokenSet(access_token="A")


def test_reading_creates_nothing_and_a_damaged_file_is_named(tmp_path):
    store = FileTokenStore(tmp_path / "cache")
    assert store.load("carol") is None and store.local_password_hash("carol") is None
    assert not (tmp_path / "cache").exists()
    (tmp_path / "cache" / "carol").mkdir(parents=True)
    (tmp_path / "cache" / "carol" / "oauth2-token.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ValueError, match="oauth2-token.json of 'carol'"):
        store.load("carol")
