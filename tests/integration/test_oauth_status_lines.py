"""``pop3proxy oauth status`` prints one line per account, whatever the authorization server answered:
the HTTP library's error text runs over several lines (an HTTP 503 carries a "For more information"
line), and a recorded error is shown on the account's line.

The fault (a token endpoint answering 503) comes from a small scripted HTTP server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers.common import HOST, write_config

from pop3proxy.config import OAuth2Settings
from pop3proxy.proxy.oauth.manager import TokenUnavailable, renew_locked
from pop3proxy.proxy.oauth.tokens import TokenSet, load_tokens, save_tokens


class Unavailable(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html>\n<body>\n<h1>503 Service Unavailable</h1>\nNo server is available.\n</body>\n</html>\n"
        self.send_response(503)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def token_endpoint():
    server = ThreadingHTTPServer((HOST, 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{server.server_address[1]}/token"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_status_is_one_line_per_account_after_an_http_error(tmp_path, token_endpoint):
    root = tmp_path / "cache"
    accounts = {}
    for name in ("alpha", "beta"):
        accounts[name] = {"client_id": "service", "client_secret": "s", "grant": "client_credentials",
                          "token_url": token_endpoint, "timeout": 10}
        save_tokens(root, name, TokenSet(access_token="old", expires_at=1.0))  # expired long ago
        with pytest.raises(TokenUnavailable):
            renew_locked(root, name, OAuth2Settings(**accounts[name]))
        assert "503" in load_tokens(root, name).error  # the failure is recorded
    config = write_config(tmp_path / "proxy.toml", {
        "upstream": {"host": HOST, "tls": "none"},
        "cache": {"root": root},
        **{f"accounts.{name}": {} for name in accounts},
        **{f"accounts.{name}.oauth2": settings for name, settings in accounts.items()},
    })
    done = subprocess.run(
        [sys.executable, "-m", "pop3proxy", "oauth", "status", "-c", str(config)], capture_output=True, text=True,
        timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for name, line in zip(("alpha", "beta"), lines):
        assert line.startswith(f"{name}: expired") and "last error" in line and "503" in line, line
