"""The body of ``pop3proxy oauth login`` and ``pop3proxy oauth status`` (blocking, for the CLI).

Flows: the device-code flow (prints a code and a URL; works headless and over ssh), the
authorization-code flow with PKCE and a one-shot redirect listener on 127.0.0.1, and the
client-credentials grant. Tokens are written to the token store (`TokenStore`; the one machine's keeps
them in a file of mode 0600) and never printed.
"""

from __future__ import annotations

import http.server
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pop3proxy.config import OAuth2Settings
from pop3proxy.ops import metrics
from pop3proxy.proxy.oauth import flows
from pop3proxy.proxy.oauth.tokens import (
    NEEDS_AUTHORISATION,
    StoreOrRoot,
    TokenSet,
    has_local_password,
    load_tokens,
    save_tokens,
    token_store,
)

REDIRECT_HOST = "127.0.0.1"
REDIRECT_PATH = "/callback"
Out = Callable[[str], None]


def device_flow(settings: OAuth2Settings, out: Out) -> dict:
    device = flows.start_device(settings)
    out(f"To authorise, open {device.verification_uri} and enter the code {device.user_code}")
    if device.verification_uri_complete:
        out(f"(or open {device.verification_uri_complete})")
    out(f"Waiting for the approval (the code is valid for {device.expires_in:.0f} s)...")
    return flows.poll_device(settings, device)


class _RedirectServer(http.server.HTTPServer):
    result: dict[str, str] | None = None  # the redirect's query, once it came


class _Redirect(http.server.BaseHTTPRequestHandler):
    server: _RedirectServer
    result: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urllib.parse.urlsplit(self.path)
        if url.path != REDIRECT_PATH:
            self.send_error(404)
            return
        params = dict(urllib.parse.parse_qsl(url.query))
        self.server.result = params
        ok = "code" in params and "error" not in params
        body = (b"pop3proxy: authorised, you can close this page." if ok
                else b"pop3proxy: the authorisation did not succeed; see the terminal.")
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # the query holds the code: never log it
        pass


def code_flow(settings: OAuth2Settings, out: Out, port: int = 0, timeout: float = 300.0) -> dict:
    """Authorization code + PKCE; the redirect comes to a listener on 127.0.0.1 that takes one request."""
    server = _RedirectServer((REDIRECT_HOST, port), _Redirect)
    server.timeout = 1.0
    try:
        redirect_uri = f"http://{REDIRECT_HOST}:{server.server_address[1]}{REDIRECT_PATH}"
        request = flows.authorization_request(settings, redirect_uri)
        out("To authorise, open this URL in a browser on this machine (or forward the port over ssh):")
        out(request.url)
        out(f"Waiting for the redirect to {redirect_uri} ...")
        deadline = time.monotonic() + timeout
        while server.result is None:
            if time.monotonic() > deadline:
                raise flows.OAuthFailure(f"no redirect within {timeout:g} s")
            server.handle_request()
        params: dict[str, str] = server.result
    finally:
        server.server_close()
    if params.get("state") != request.state:
        raise flows.OAuthFailure("the redirect's state does not match (refusing the code)")
    if "error" in params:
        detail = f"{params['error']} {params.get('error_description', '')}"
        raise flows.OAuthFailure(f"authorisation refused: {detail}".strip())
    if "code" not in params:
        raise flows.OAuthFailure("the redirect carries no code")
    return flows.exchange_code(settings, request, params["code"])


def login(store: StoreOrRoot, account: str, settings: OAuth2Settings, flow: str, out: Out,
          port: int = 0, timeout: float = 300.0) -> TokenSet:
    """Run `flow` (device, code or client_credentials) and store the tokens in `store` (a `TokenStore`,
    or a cache root); return them."""
    store = token_store(store)
    if flow == "client_credentials" or settings.grant == "client_credentials":
        answer = flows.client_credentials(settings)
    elif flow == "code":
        answer = code_flow(settings, out, port, timeout)
    else:
        answer = device_flow(settings, out)
    tokens = TokenSet.from_response(answer)
    save_tokens(store, account, tokens)
    metrics.oauth2_state(account, False)
    when = _when(tokens.expires_at)
    refresh = "with a refresh token" if tokens.refresh_token else "without a refresh token"
    out(f"Authorised {account!r}: access token valid until {when}, {refresh}.")
    if not has_local_password(store, account) and settings.grant != "client_credentials":
        out(f"Now set the password your mail program logs in with: pop3proxy passwd {account}")
    return tokens


def _when(stamp: float) -> str:
    if not stamp:
        return "unknown"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def status(store: StoreOrRoot, accounts: dict[str, OAuth2Settings], now: float | None = None) -> list[dict]:
    """One entry per OAuth2 account: state, expiry, refresh token and local password present (read from
    `store`, a `TokenStore` or a cache root)."""
    store = token_store(store)
    now = time.time() if now is None else now
    rows: list[dict[str, Any]] = []
    for name, settings in sorted(accounts.items()):
        try:
            tokens = load_tokens(store, name)
        except ValueError as exc:
            rows.append({"account": name, "state": "damaged", "detail": str(exc)})
            continue
        if tokens is None:
            state = "not authorised" if settings.grant == "user" else "no token yet"
        elif tokens.state == NEEDS_AUTHORISATION:
            state = "needs authorisation"
        elif tokens.valid_for(now) <= 0:
            state = "expired"
        else:
            state = "valid"
        rows.append({
            "account": name,
            "state": state,
            "expires": _when(tokens.expires_at) if tokens else "-",
            "refresh_token": bool(tokens and tokens.refresh_token),
            "local_password": has_local_password(store, name),
            "detail": (tokens.error if tokens else "") or "",
        })
    return rows


def format_status(rows: list[dict]) -> str:
    if not rows:
        return "no account uses OAuth2"
    lines = []
    for row in rows:
        line = f"{row['account']}: {row['state']}"
        if "expires" in row:
            line += f", expires {row['expires']}"
            line += ", refresh token" if row["refresh_token"] else ", no refresh token"
            line += ", local password set" if row["local_password"] else ", NO local password (pop3proxy passwd)"
        if row.get("detail"):  # one line per account, whatever was recorded (older versions kept several)
            line += f" — last error: {flows.one_line(row['detail'])}"
        lines.append(line)
    return "\n".join(lines)
