"""A client for rspamd's normal worker: ``POST /checkv2`` with the message as the body.

Request headers: ``User`` (the mailbox owner, which rspamd logs and uses for per-user settings) and
``Queue-Id`` (the message's id in the cache, so rspamd's log line can be matched to ours). The reply
is JSON::

    {"action": "reject", "score": 15.0, "required_score": 15.0,
     "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, ...}, ...}, ...}

`parse_reply` is pure; `RspamdClient.check` does the HTTP exchange (stdlib ``http.client``) over
TCP (``http://host:port``) or a unix socket (``/path/to/socket``). Every failure is an `RspamdError`.

Learning goes to the other worker, the controller (`RspamdController`, over httpx): ``POST
/learnspam`` or ``/learnham`` with the message as the body and the controller's password in the
``Password`` header. It answers 200 ``{"success": true}`` when its Bayes learnt the message, 208
when it already had (``"... has been already learned as spam, ignore it"``), 204 with the reason in
the status line when it would not (too few tokens), 401/403 for a wrong or missing password.
``GET /stat`` gives, per statfile (``BAYES_SPAM``, ``BAYES_HAM``), its ``revision``: how many
messages that class has learnt; with the redis backend rspamd refreshes those numbers from redis
every 30 to 60 seconds, so a learn shows there after up to a minute.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import urllib.parse
from dataclasses import dataclass, field

import httpx

MAX_REPLY = 4 << 20
CONTROLLER_PORT = 11334
LEARN_CLASSES = ("spam", "ham")


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
    assert isinstance(score, (int, float)) and isinstance(required, (int, float))  # checked just above
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


def parse_stat(body: bytes) -> tuple[int, int]:
    """(spam, ham) messages learnt, from the controller's ``/stat``: the ``revision`` of the statfiles
    whose symbol ends in SPAM and HAM (``BAYES_SPAM``, ``BAYES_HAM``), summed over classifiers."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise RspamdError(f"rspamd /stat reply is not JSON: {exc}") from None
    statfiles = doc.get("statfiles") if isinstance(doc, dict) else None
    if not isinstance(statfiles, list):
        raise RspamdError("rspamd /stat reply has no statfiles list")
    counts = {"spam": 0, "ham": 0}
    for statfile in statfiles:
        if not isinstance(statfile, dict):
            raise RspamdError("rspamd /stat reply: a statfile is not an object")
        symbol, revision = str(statfile.get("symbol", "")).upper(), statfile.get("revision", 0)
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise RspamdError(f"rspamd /stat reply: bad revision {revision!r} of {symbol or 'a statfile'}")
        label = "spam" if symbol.endswith("SPAM") else "ham" if symbol.endswith("HAM") else None
        if label is not None:
            counts[label] += revision
    return counts["spam"], counts["ham"]


def _reason(reason: str, body: bytes) -> str:
    """rspamd's own words for a refusal: the JSON ``error``, else the body, else the status line."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"][:300]
    return body[:300].decode("utf-8", "replace").strip() or reason


class RspamdController:
    """rspamd's controller worker: learning and the counts of what its Bayes learnt.

    ``address``: ``host:port`` (port 11334 when left out), ``http(s)://host:port`` (optionally with
    a path prefix), or the absolute path of the controller's unix socket. ``password``: the
    controller's ``password`` (its ``enable_password`` when one is set: learning needs that one),
    sent in the ``Password`` header; it never appears in errors, logs or ``repr()``.
    """

    def __init__(self, address: str, password: str = "", timeout: float = 30.0) -> None:
        self.address, self.timeout, self._password = address, timeout, password
        self._socket_path = ""
        if address.startswith("/"):
            self._socket_path, self._base = address, "http://localhost"
            return
        url = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"bad rspamd controller {address!r}: expected host:port, http://host:port or "
                             "/path/to/socket")
        try:
            port = url.port or (443 if url.scheme == "https" else CONTROLLER_PORT)
        except ValueError:
            raise ValueError(f"bad rspamd controller {address!r}: bad port") from None
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        self._base = f"{url.scheme}://{host}:{port}{url.path.rstrip('/')}"

    def __repr__(self) -> str:
        return f"RspamdController({self.address!r})"

    def _request(self, method: str, path: str, body: bytes | None = None, user: str = "") -> tuple[int, str, bytes]:
        where = f"the rspamd controller at {self.address}"
        headers = {"Connection": "close"}
        if user:
            headers["User"] = _header_value("user name", user)
        if self._password:
            headers["Password"] = self._password
        transport = httpx.HTTPTransport(uds=self._socket_path) if self._socket_path else None
        try:
            with (
                httpx.Client(transport=transport, timeout=self.timeout, trust_env=False) as client,
                client.stream(method, self._base + path, content=body, headers=headers) as response,
            ):
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > MAX_REPLY:
                        raise RspamdError(f"{where}: reply longer than {MAX_REPLY} octets")
                    chunks.append(chunk)
                return response.status_code, response.reason_phrase, b"".join(chunks)
        except httpx.TimeoutException:
            raise RspamdError(f"{where} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise RspamdError(f"cannot reach {where}: {type(exc).__name__}: {exc}") from None

    def _refused(self, status: int, reason: str, body: bytes) -> RspamdError:
        where = f"the rspamd controller at {self.address}"
        if status in (401, 403):
            given = "refused the password" if self._password else "wants a password"
            return RspamdError(f"{where} {given}: set controller_password (or controller_password_file) "
                               "to its password (its enable_password, when it has one, for learning)")
        return RspamdError(f"{where} answered HTTP {status}: {_reason(reason, body)}")

    def learn(self, message: bytes, label: str, user: str = "") -> bool:
        """Have rspamd's Bayes learn the message as spam or ham: True when it learnt it now, False when
        it already had (rspamd's 208). Raises `RspamdError` when it will not or cannot."""
        if label not in LEARN_CLASSES:
            raise ValueError(f"label must be spam or ham, not {label!r}")
        status, reason, body = self._request("POST", f"/learn{label}", message, user)
        text = _reason(reason, body)
        if status == 208 or "already learned" in text:
            return False
        if status == 200:
            return True
        if 200 <= status < 300:
            raise RspamdError(f"rspamd did not learn the message: {text}")
        raise self._refused(status, reason, body)

    def stat(self) -> tuple[int, int]:
        """(spam, ham) messages rspamd's Bayes has learnt, as its controller last counted them."""
        status, reason, body = self._request("GET", "/stat")
        if status != 200:
            raise self._refused(status, reason, body)
        return parse_stat(body)
