"""A real OAuth2 authorization server (the npm package oidc-provider) and an OAuth2-only Dovecot.

`OidcServer` runs ``node tests/helpers/oidc/server.js PORT`` (installed by ``npm ci`` in that
folder, see .ci/install-deps.sh). Its clients: ``pop3proxy`` (public; device flow, code + PKCE,
refresh), ``confidential`` (same, with a secret), ``service`` (client credentials; its tokens are
for the mailbox `service_user`) and ``dovecot`` (introspects tokens). The browser's part of a login
is automated by the server script (it signs in the ``login_hint`` account and grants every scope);
`approve_device` and `follow` play the user's clicks with plain HTTP.

Fixtures:

* ``oidc_server`` (session): the running `OidcServer` (access tokens live an hour).
* ``oauth_dovecot`` (session): a `Dovecot` whose only passdb is ``oauth2``, validating tokens by
  introspection at ``oidc_server``; it offers SASL XOAUTH2 and OAUTHBEARER.
* ``short_oidc`` (function): a fresh server whose access tokens are JWTs that live `SHORT_TTL`
  seconds, with its own OAuth2-only Dovecot (``short_oidc.dovecot``) validating them locally with
  the signing key (so tokens keep working while the authorization server is down); stopped after
  the test.
"""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from helpers.common import HOST
from helpers.dovecot import Dovecot, DovecotError, free_port

HERE = Path(__file__).resolve().parent / "oidc"
SHORT_TTL = 6
SERVICE_USER = "service-box"
_READY = re.compile(r"oidc listening on (\d+)")


class OidcServer:
    def __init__(self, access_ttl: int = 3600, jwt: bool = False) -> None:
        self.access_ttl = access_ttl
        # jwt: access tokens are JWTs (HS256) that Dovecot validates locally, so the provider keeps
        # accepting a token while this server is down, as real providers do.
        self.jwt_key = secrets.token_urlsafe(32) if jwt else None
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self.service_user = SERVICE_USER
        self.dovecot: Dovecot | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, port: int | None = None, timeout: float = 20.0) -> "OidcServer":
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not installed: apt-get install nodejs npm (see .ci/install-deps.sh)")
        if not (HERE / "node_modules" / "oidc-provider").is_dir():
            pytest.fail(f"oidc-provider is not installed: run `npm ci` in {HERE} (see .ci/install-deps.sh)")
        self.port = port or free_port()
        self.log.clear()
        self.proc = subprocess.Popen(
            [node, str(HERE / "server.js"), str(self.port)],
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={"PATH": "/usr/bin:/bin", "OIDC_ACCESS_TTL": str(self.access_ttl),
                 "OIDC_SERVICE_USER": self.service_user,
                 **({"OIDC_JWT_KEY": self.jwt_key} if self.jwt_key else {})},
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self.log.append(line.rstrip("\n"))
                if _READY.search(line):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("oidc-provider did not start:\n" + "\n".join(self.log))
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- what a test needs from the authorization server --------------------------------------

    def dovecot_settings(self, key_dir: Path | None = None) -> dict[str, str]:
        """Dovecot's oauth2 passdb settings: local JWT validation with the key in `key_dir`, or
        introspection (RFC 7662) at this server."""
        if self.jwt_key is not None:
            assert key_dir is not None
            return {
                "introspection_mode": "local",
                "local_validation_key_dict": f"fs:posix:prefix={key_dir}/",
                "username_attribute": "username",
                "issuers": self.url,
            }
        return {
            "introspection_mode": "post",
            "introspection_url": f"http://dovecot:dovecot-secret@{HOST}:{self.port}/token/introspection",
            "username_attribute": "username",
            "active_attribute": "active",
            "active_value": "true",
        }

    def oauth2_config(self, client_id: str = "pop3proxy", **extra) -> dict:
        """An ``[accounts."name".oauth2]`` table for pop3proxy (the generic form)."""
        return {
            "client_id": client_id,
            "token_url": f"{self.url}/token",
            "device_url": f"{self.url}/device/auth",
            "authorization_url": f"{self.url}/auth",
            "scopes": ["openid", "offline_access", "pop3"],
            **extra,
        }

    def token_for(self, user: str) -> dict:
        """A user's token set (access + refresh), got through the device flow as a user would."""
        with httpx.Client() as http:
            device = http.post(f"{self.url}/device/auth", data={
                "client_id": "pop3proxy", "scope": "openid offline_access pop3"}).json()
            self.approve_device(device["verification_uri_complete"], user)
            reply = http.post(f"{self.url}/token", data={
                "client_id": "pop3proxy", "device_code": device["device_code"],
                "grant_type": "urn:ietf:params:oauth:grant-type:device_code"})
            reply.raise_for_status()
            return reply.json()

    def approve_device(self, verification_uri_complete: str, user: str = "alice") -> str:
        """The user opens the device page, confirms the code and signs in as `user`."""
        with httpx.Client(follow_redirects=True) as http:
            page = http.get(verification_uri_complete)
            page.raise_for_status()
            xsrf = re.search(r'name="xsrf" value="([^"]+)"', page.text).group(1)
            code = re.search(r'name="user_code" value="([^"]+)"', page.text).group(1)
            # The interaction hint: the server script signs in login_hint; the device flow carries
            # none, so the account comes from the session set here.
            http.cookies.set("test_login_hint", user)
            done = http.post(page.url.copy_with(query=None), data={
                "xsrf": xsrf, "user_code": code, "confirm": "yes"})
            done.raise_for_status()
            if "Success" not in done.text:
                raise AssertionError(f"device approval failed: {done.text[:500]}")
            return done.text

    def follow(self, authorization_url: str) -> httpx.Response:
        """The user opens the authorization URL; return the final redirect to the client."""
        with httpx.Client(follow_redirects=False) as http:
            url = authorization_url
            for _ in range(10):
                reply = http.get(url)
                if reply.status_code not in (302, 303):
                    raise AssertionError(f"authorization stopped at {reply.status_code}: {reply.text[:300]}")
                url = str(reply.url.join(reply.headers["location"]))
                if not url.startswith(self.url):
                    return reply
            raise AssertionError("too many redirects")

    def revoke(self, token: str, client_id: str = "pop3proxy") -> None:
        with httpx.Client() as http:
            http.post(f"{self.url}/token/revocation", data={"token": token, "client_id": client_id}).raise_for_status()

    def start_dovecot(self) -> Dovecot:
        key_dir = None
        if self.jwt_key is not None:
            # Dovecot looks the key up as <prefix><azp>/<alg>/<kid>; HMAC keys are base64.
            key_dir = Path(tempfile.mkdtemp(prefix="jwk", dir="/tmp"))
            self._key_dir = key_dir
            (key_dir / "default" / "HS256").mkdir(parents=True)
            (key_dir / "default" / "HS256" / "default").write_text(
                base64.b64encode(self.jwt_key.encode()).decode() + "\n")
            for path in (key_dir, key_dir / "default", key_dir / "default" / "HS256"):
                path.chmod(0o755)
            (key_dir / "default" / "HS256" / "default").chmod(0o644)
        server = Dovecot(oauth2=self.dovecot_settings(key_dir))
        try:
            server.start()
        except DovecotError as exc:
            server.stop()
            pytest.fail(str(exc), pytrace=False)
        self.dovecot = server
        return server


@pytest.fixture(scope="session")
def oidc_server() -> Iterator[OidcServer]:
    server = OidcServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oauth_dovecot(oidc_server: OidcServer) -> Iterator[Dovecot]:
    server = oidc_server.start_dovecot()
    yield server
    server.stop()


@pytest.fixture
def short_oidc() -> Iterator[OidcServer]:
    server = OidcServer(access_ttl=SHORT_TTL, jwt=True).start()
    server.start_dovecot()
    yield server
    assert server.dovecot is not None
    server.dovecot.stop()
    server.stop()
    shutil.rmtree(server._key_dir, ignore_errors=True)


def authorise_by_device(oidc: OidcServer, config: Path, account: str, env: dict[str, str] | None = None) -> None:
    """`pop3proxy oauth login ACCOUNT -c CONFIG` as a person would run it: the device flow, approved at
    the authorization server."""
    proc = subprocess.Popen([sys.executable, "-m", "pop3proxy", "oauth", "login", account, "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"\(or open (\S+)\)", line)
        if match:
            oidc.approve_device(match.group(1), account)
            break
    output = proc.stdout.read()
    assert proc.wait(60) == 0, output

