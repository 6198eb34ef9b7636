"""OAuth2 settings, the token file and the local password: no daemons, no sockets."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pop3proxy.config import OAuth2Settings, Settings, masked
from pop3proxy.proxy.oauth import login, tokens
from pop3proxy.proxy.oauth.manager import _skew
from pop3proxy.store import token_files


def test_presets_fill_endpoints_and_scopes():
    ms = OAuth2Settings(provider="microsoft", client_id="c", tenant="contoso.onmicrosoft.com")
    assert ms.endpoint("token_url") == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert ms.endpoint("device_url").endswith("/oauth2/v2.0/devicecode")
    assert "offline_access" in ms.effective_scopes()
    service = OAuth2Settings(provider="microsoft", client_id="c", grant="client_credentials", client_secret="s")
    assert service.effective_scopes() == ["https://outlook.office365.com/.default"]
    google = OAuth2Settings(provider="google", client_id="c", token_url="https://override.example/token")
    assert google.endpoint("token_url") == "https://override.example/token"
    assert google.effective_scopes() == ["https://mail.google.com/"]


@pytest.mark.parametrize("values,message", [
    ({"client_id": "c"}, "token_url is required"),
    ({"client_id": "c", "token_url": "t", "client_secret": "a", "client_secret_file": "/f"}, "not both"),
    ({"client_id": "c", "token_url": "t", "grant": "client_credentials"}, "needs client_secret"),
    ({"provider": "yahoo", "client_id": "c"}, "microsoft"),
])
def test_bad_oauth2_settings_are_clear_errors(values, message):
    with pytest.raises(ValidationError, match=message):
        OAuth2Settings(**values)


def test_check_config_masks_the_client_secret_but_not_the_urls():
    settings = Settings(upstream={"host": "h"}, accounts={"a": {"oauth2": {
        "client_id": "c", "token_url": "https://t.example/token", "client_secret": "s3cret"}}})
    shown = masked(settings)["accounts"]["a"]["oauth2"]
    assert shown["client_secret"] == "***" and shown["token_url"] == "https://t.example/token"


def test_token_file_round_trip_mode_and_refresh_token_kept(tmp_path):
    first = tokens.TokenSet.from_response(
        {"access_token": "A1", "refresh_token": "R1", "expires_in": 60}, now=1000.0)
    tokens.save_tokens(tmp_path, "al/ice", first)
    path = token_files.token_path(tmp_path, "al/ice")
    assert path.parent.parent == tmp_path  # the user name cannot leave the cache root
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = tokens.load_tokens(tmp_path, "al/ice")
    assert (loaded.access_token, loaded.refresh_token, loaded.expires_at) == ("A1", "R1", 1060.0)
    # A refresh answer without a new refresh token keeps the old one (Google does this).
    second = tokens.TokenSet.from_response({"access_token": "A2", "expires_in": 60}, loaded, now=1050.0)
    assert second.refresh_token == "R1" and second.expires_at == 1110.0
    assert "A2" not in repr(second) and "R1" not in repr(second)
    assert tokens.load_tokens(tmp_path, "nobody") is None


def test_damaged_token_file_is_an_error_not_a_deletion(tmp_path):
    tokens.save_tokens(tmp_path, "bob", tokens.TokenSet(access_token="A"))
    path = token_files.token_path(tmp_path, "bob")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="oauth2-token.json"):
        tokens.load_tokens(tmp_path, "bob")
    assert path.exists()
    [row] = login.status(tmp_path, {"bob": OAuth2Settings(client_id="c", token_url="t")})
    assert row["state"] == "damaged"


def test_local_password(tmp_path):
    assert not tokens.check_local_password(tmp_path, "carol", "anything")  # none set: no login
    # (a space: a password that cannot turn up by chance inside the base64 text of the hash)
    tokens.set_local_password(tmp_path, "carol", "pw 1")
    path = token_files.token_path(tmp_path, "carol").parent / token_files.LOCAL_PASSWORD_FILE
    assert path.stat().st_mode & 0o777 == 0o600 and "pw 1" not in path.read_text()
    assert tokens.check_local_password(tmp_path, "carol", "pw 1")
    assert not tokens.check_local_password(tmp_path, "carol", "PW 1")
    with pytest.raises(ValueError):
        tokens.set_local_password(tmp_path, "carol", "two\nlines")


def test_status_states_and_format(tmp_path):
    settings = {name: OAuth2Settings(client_id="c", token_url="t") for name in ("new", "ok", "old", "revoked")}
    tokens.save_tokens(tmp_path, "ok", tokens.TokenSet(access_token="A", refresh_token="R", expires_at=2000.0))
    tokens.save_tokens(tmp_path, "old", tokens.TokenSet(access_token="A", expires_at=500.0))
    tokens.save_tokens(tmp_path, "revoked", tokens.TokenSet(access_token="A", state=tokens.NEEDS_AUTHORISATION,
                                                            error="token refresh: invalid_grant (revoked)"))
    rows = {row["account"]: row for row in login.status(tmp_path, settings, now=1000.0)}
    assert {name: row["state"] for name, row in rows.items()} == {
        "new": "not authorised", "ok": "valid", "old": "expired", "revoked": "needs authorisation"}
    text = login.format_status(list(rows.values()))
    assert "revoked: needs authorisation" in text and "invalid_grant" in text
    assert "\"A\"" not in json.dumps(list(rows.values()))


def test_short_lived_tokens_are_renewed_before_use_at_a_quarter_of_their_life():
    assert _skew(tokens.TokenSet(expires_at=1006.0, updated=1000.0)) == 1.5
    assert _skew(tokens.TokenSet(expires_at=4600.0, updated=1000.0)) == 30.0
    assert _skew(None) == 30.0
