"""Talking to the authorization server, with authlib's OAuth2 client (over httpx). Synchronous:
the service runs these in worker threads, the CLI calls them directly.

Failures are sorted into two kinds: `InvalidGrant` (the server refused the grant: the refresh
token was revoked or expired, or the user declined) and `TransientFailure` (everything else: the
server is down or slow, a 5xx, an answer that is not JSON, another OAuth2 error). Only the first
means the account needs authorising again.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from authlib.common.security import generate_token
from authlib.integrations.base_client.errors import OAuthError

with warnings.catch_warnings():  # some authlib releases warn about their httpx module on import
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import OAuth2Client

from pop3proxy.config import OAuth2Settings

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class OAuthFailure(Exception):
    """A request to the authorization server failed; the text holds no token or secret."""


class InvalidGrant(OAuthFailure):
    pass


class TransientFailure(OAuthFailure):
    pass


def client_secret(settings: OAuth2Settings) -> str | None:
    if settings.client_secret is not None:
        return settings.client_secret
    if settings.client_secret_file is not None:
        path = Path(settings.client_secret_file)
        try:
            if path.stat().st_mode & 0o077:
                raise TransientFailure(f"client_secret_file {path} is readable by others; chmod 600 it")
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TransientFailure(f"cannot read client_secret_file {path}: {exc.strerror}") from None
    return None


def _client(settings: OAuth2Settings, redirect_uri: str | None = None) -> OAuth2Client:
    secret = client_secret(settings)
    return OAuth2Client(
        client_id=settings.client_id,
        client_secret=secret,
        token_endpoint_auth_method="client_secret_basic" if secret else "none",
        scope=" ".join(settings.effective_scopes()) or None,
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        timeout=settings.timeout,
        trust_env=False,
    )


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (the HTTP library's and servers' texts run over several), at most ``limit``
    characters: what `oauth status` shows and the logs keep."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _http_error(what: str, exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.HTTPStatusError):  # its text adds a "For more information" line
        return f"{what}: HTTP {exc.response.status_code} {exc.response.reason_phrase} from the authorization server"
    return one_line(f"{what}: {type(exc).__name__}: {exc}")


def _call(what: str, request: Callable[[], dict]) -> dict:
    try:
        token = request()
    except OAuthError as exc:
        if exc.error == "invalid_grant":
            raise InvalidGrant(one_line(f"{what}: invalid_grant ({exc.description or 'refused'})")) from None
        raise TransientFailure(one_line(f"{what}: {exc.error} ({exc.description or 'no description'})")) from None
    except httpx.HTTPError as exc:
        raise TransientFailure(_http_error(what, exc)) from None
    except ValueError as exc:  # not JSON (a proxy's error page, a 5xx)
        raise TransientFailure(one_line(f"{what}: invalid answer from the authorization server ({exc})")) from None
    if not isinstance(token, dict) or not token.get("access_token"):
        raise TransientFailure(f"{what}: the authorization server sent no access token")
    return dict(token)


def refresh(settings: OAuth2Settings, refresh_token: str) -> dict:
    """A new token set for a refresh token (the answer may or may not carry a new refresh token)."""
    url = settings.endpoint("token_url")
    with _client(settings) as client:
        return _call("token refresh", lambda: client.refresh_token(url, refresh_token=refresh_token))


def client_credentials(settings: OAuth2Settings) -> dict:
    """A token for a service principal (the client-credentials grant)."""
    url = settings.endpoint("token_url")
    with _client(settings) as client:
        return _call("client credentials", lambda: client.fetch_token(url, grant_type="client_credentials"))


@dataclass(frozen=True)
class DeviceCode:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def start_device(settings: OAuth2Settings) -> DeviceCode:
    """Ask for a device code (RFC 8628)."""
    url = settings.endpoint("device_url")
    if not url:
        raise OAuthFailure("this account has no device_url (use --flow code)")
    data = {"client_id": settings.client_id, "scope": " ".join(settings.effective_scopes())}
    with _client(settings) as client:
        try:
            reply = client.request("POST", url, data=data, withhold_token=True)
            body = reply.json()
        except httpx.HTTPError as exc:
            raise TransientFailure(_http_error("device authorization", exc)) from None
        except ValueError:
            raise TransientFailure(f"device authorization: invalid answer (HTTP {reply.status_code})") from None
    if not isinstance(body, dict) or "device_code" not in body:
        error = body.get("error") if isinstance(body, dict) else None
        raise OAuthFailure(f"device authorization refused: {error or reply.status_code}")
    return DeviceCode(
        device_code=body["device_code"],
        user_code=body["user_code"],
        verification_uri=body.get("verification_uri") or body.get("verification_url") or "",
        verification_uri_complete=body.get("verification_uri_complete"),
        expires_in=float(body.get("expires_in", 600)),
        interval=float(body.get("interval", 5)),
    )


def poll_device(settings: OAuth2Settings, device: DeviceCode, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Poll the token endpoint until the user approved (or declined, or the code expired)."""
    url = settings.endpoint("token_url")
    interval = max(device.interval, 1.0)
    deadline = time.monotonic() + device.expires_in
    with _client(settings) as client:
        while time.monotonic() < deadline:
            sleep(interval)
            try:
                return dict(client.fetch_token(url, grant_type=DEVICE_GRANT, device_code=device.device_code))
            except OAuthError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5
                    continue
                ended = f"device authorization ended: {exc.error} ({exc.description or ''})"
                raise OAuthFailure(one_line(ended)) from None
            except httpx.HTTPError as exc:
                raise TransientFailure(_http_error("device authorization", exc)) from None
    raise OAuthFailure("the device code expired before it was approved")


@dataclass(frozen=True)
class CodeRequest:
    url: str
    state: str
    code_verifier: str
    redirect_uri: str


def authorization_request(settings: OAuth2Settings, redirect_uri: str) -> CodeRequest:
    """The URL the user opens for the authorization-code flow with PKCE (S256)."""
    url = settings.endpoint("authorization_url")
    if not url:
        raise OAuthFailure("this account has no authorization_url (use --flow device)")
    verifier = generate_token(64)
    state = secrets.token_urlsafe(24)
    with _client(settings, redirect_uri) as client:
        uri, state = client.create_authorization_url(url, state=state, code_verifier=verifier)
    return CodeRequest(uri, state, verifier, redirect_uri)


def exchange_code(settings: OAuth2Settings, request: CodeRequest, code: str) -> dict:
    url = settings.endpoint("token_url")
    with _client(settings, request.redirect_uri) as client:
        return _call("code exchange", lambda: client.fetch_token(
            url, grant_type="authorization_code", code=code, code_verifier=request.code_verifier))
