"""A client for rspamd's normal worker: ``POST /checkv2`` with the message as the body.

Request headers: ``User`` (the mailbox owner, which rspamd logs and uses for per-user settings) and
``Queue-Id`` (the message's id in the cache, so rspamd's log line can be matched to ours). The reply
is JSON::

    {"action": "reject", "score": 15.0, "required_score": 15.0,
     "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, ...}, ...}, ...}

`parse_reply` is pure; `RspamdClient.check` does the HTTP exchange (stdlib ``http.client``) over
TCP (``http://host:port``) or a unix socket (``/path/to/socket``). Every failure is an `RspamdError`.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import urllib.parse
from dataclasses import dataclass, field

MAX_REPLY = 4 << 20


class RspamdError(Exception):
    """rspamd could not be reached, did not answer in time, refused, or answered garbage."""


@dataclass(frozen=True)
class RspamdReply:
    score: float
    required_score: float
    action: str
    symbols: list[str] = field(default_factory=list)


def parse_reply(status: int, body: bytes) -> RspamdReply:
    """Parse the HTTP status and body of a /checkv2 reply."""
    if status != 200:
        text = body[:200].decode("utf-8", "replace").strip()
        raise RspamdError(f"rspamd answered HTTP {status}: {text}")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise RspamdError(f"rspamd reply is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RspamdError("rspamd reply is not a JSON object")
    if "error" in doc and "score" not in doc:
        raise RspamdError(f"rspamd could not check the message: {doc['error']}")
    score, required, action = doc.get("score"), doc.get("required_score"), doc.get("action")
    for name, value in (("score", score), ("required_score", required)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RspamdError(f"rspamd reply has no numeric {name}: {value!r}")
    if not isinstance(action, str):
        raise RspamdError(f"rspamd reply has no action: {action!r}")
    symbols = doc.get("symbols", {})
    if not isinstance(symbols, dict):
        raise RspamdError("rspamd reply: 'symbols' is not an object")
    return RspamdReply(float(score), float(required), action, sorted(str(name) for name in symbols))


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _header_value(name: str, value: str) -> str:
    if any(c in value for c in "\r\n\0") or not value.isprintable():
        raise RspamdError(f"cannot send {name} {value!r} to rspamd: not a printable one-line value")
    return value


class RspamdClient:
    """``address``: ``http://host:port`` (optionally with a path prefix), ``https://…``, or the
    absolute path of rspamd's unix socket."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.address = address
        if address.startswith("/"):
            self.socket_path, self.scheme, self.host, self.port, self.prefix = address, "http", "", 0, ""
            return
        url = urllib.parse.urlsplit(address)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"bad rspamd address {address!r}: expected http://host:port or /path/to/socket")
        try:
            port = url.port
        except ValueError:
            raise ValueError(f"bad rspamd address {address!r}: bad port") from None
        self.socket_path = ""
        self.scheme, self.host = url.scheme, url.hostname
        self.port = port or (443 if url.scheme == "https" else 11333)
        self.prefix = url.path.rstrip("/")

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path:
            return _UnixHTTPConnection(self.socket_path, self.timeout)
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def check(self, message: bytes, user: str = "", queue_id: str = "") -> RspamdReply:
        headers = {"Content-Length": str(len(message)), "Connection": "close"}
        if user:
            headers["User"] = _header_value("user name", user)
        if queue_id:
            headers["Queue-Id"] = _header_value("queue id", queue_id)
        where = f"rspamd at {self.address}"
        conn = self._connection()
        try:
            try:
                conn.connect()
            except TimeoutError:
                raise RspamdError(f"cannot connect to {where}: no answer within {self.timeout:g} s") from None
            except OSError as exc:
                raise RspamdError(f"cannot connect to {where}: {exc.strerror or exc}") from None
            try:
                conn.request("POST", f"{self.prefix}/checkv2", body=message, headers=headers)
                response = conn.getresponse()
                body = response.read(MAX_REPLY + 1)
            except TimeoutError:
                raise RspamdError(f"{where} did not answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise RspamdError(f"{where}: {type(exc).__name__}: {exc}") from None
            if len(body) > MAX_REPLY:
                raise RspamdError(f"{where}: reply longer than {MAX_REPLY} octets")
            return parse_reply(response.status, body)
        finally:
            conn.close()
