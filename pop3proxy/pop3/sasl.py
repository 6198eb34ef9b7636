"""SASL messages for OAuth2 bearer tokens: XOAUTH2 (Google's and Microsoft's) and OAUTHBEARER
(RFC 7628). Formatting for the client side, parsing for the server side; no I/O.

XOAUTH2:     ``user=U ^A auth=Bearer T ^A ^A``
OAUTHBEARER: ``n,a=U, ^A host=H ^A port=P ^A auth=Bearer T ^A ^A`` (a GS2 header, then key=value
pairs separated by ^A). On failure an OAUTHBEARER server sends a base64 JSON challenge, to which
the client answers ``AQ==`` (a lone ^A) before the server says ``-ERR``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

XOAUTH2 = "XOAUTH2"
OAUTHBEARER = "OAUTHBEARER"
MECHANISMS = (XOAUTH2, OAUTHBEARER)
# The client's answer to an OAUTHBEARER error challenge (RFC 7628 3.2.3): base64 of ^A.
OAUTHBEARER_ABORT = base64.b64encode(b"\x01").decode("ascii")
# The server's error challenge when a bearer login fails (RFC 7628 3.2.2; Gmail's XOAUTH2 does the same).
ERROR_CHALLENGE = base64.b64encode(b'{"status":"invalid_token","schemes":"bearer"}')


class SaslError(ValueError):
    """A SASL message that cannot be formatted or parsed; the text is safe to show (no token)."""


class BearerToken(str):
    """A password that is an OAuth2 access token: logged in upstream with XOAUTH2 / OAUTHBEARER."""

    def __repr__(self) -> str:
        return "BearerToken(***)"


@dataclass(frozen=True)
class BearerLogin:
    """A parsed XOAUTH2 / OAUTHBEARER initial response."""

    user: str
    token: str = field(repr=False)


def _check(user: str, token: str) -> None:
    if not user or not token:
        raise SaslError("empty user name or token")
    if any(ord(c) < 0x20 or c == "\x7f" for c in user + token):
        raise SaslError("control character in the user name or token")


def xoauth2(user: str, token: str) -> str:
    """The base64 XOAUTH2 initial response."""
    _check(user, token)
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode("ascii")


def _gs2_name(user: str) -> str:
    # RFC 5801 saslname: "," and "=" are escaped as =2C and =3D.
    return user.replace("=", "=3D").replace(",", "=2C")


def oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """The base64 OAUTHBEARER initial response (RFC 7628)."""
    _check(user, token)
    if any(ord(c) < 0x20 for c in host):
        raise SaslError("control character in the host name")
    text = f"n,a={_gs2_name(user)},\x01host={host}\x01port={int(port)}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(text.encode()).decode("ascii")


def _decode(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    try:
        return base64.b64decode(data.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise SaslError("invalid base64 or UTF-8 in the SASL response") from None


def _pairs(text: str) -> dict[str, str]:
    if not text.endswith("\x01\x01"):
        raise SaslError("the SASL response does not end with two ^A")
    pairs: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SaslError("malformed key=value pair in the SASL response")
        pairs[key] = value
    return pairs


def _bearer(pairs: dict[str, str]) -> str:
    scheme, _, token = pairs.get("auth", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SaslError("the SASL response holds no bearer token")
    return token.strip()


def parse_xoauth2(data: str | bytes) -> BearerLogin:
    """Parse a base64 XOAUTH2 response."""
    pairs = _pairs(_decode(data))
    user, token = pairs.get("user", ""), _bearer(pairs)
    _check(user, token)
    return BearerLogin(user, token)


def parse_oauthbearer(data: str | bytes) -> BearerLogin:
    """Parse a base64 OAUTHBEARER response (RFC 7628); the user comes from the GS2 header."""
    text = _decode(data)
    header, sep, rest = text.partition("\x01")
    if not sep:
        raise SaslError("malformed OAUTHBEARER response")
    parts = header.split(",")
    if len(parts) != 3 or parts[0] not in ("n", "y") or parts[2] != "":
        raise SaslError("malformed GS2 header in the OAUTHBEARER response")
    user = ""
    if parts[1].startswith("a="):
        user = parts[1][2:].replace("=2C", ",").replace("=3D", "=")
    token = _bearer(_pairs(rest))
    _check(user, token)
    return BearerLogin(user, token)


def parse(mechanism: str, data: str | bytes) -> BearerLogin:
    mechanism = mechanism.upper()
    if mechanism == XOAUTH2:
        return parse_xoauth2(data)
    if mechanism == OAUTHBEARER:
        return parse_oauthbearer(data)
    raise SaslError(f"not an OAuth2 mechanism: {mechanism[:40]}")


def parse_plain(data: bytes) -> tuple[str, str]:
    """(user, password) of an AUTH PLAIN response (RFC 4616); ``=`` stands for an empty response."""
    if data == b"=":
        data = b""
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("invalid base64 in AUTH PLAIN response") from None
    parts = decoded.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("malformed AUTH PLAIN response")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise SaslError("AUTH PLAIN response is not valid UTF-8") from None
    if not authcid:
        raise SaslError("empty user name")
    if authzid and authzid != authcid:
        raise SaslError("authorization identity differs from authentication identity")
    return authcid, password


def parse_cram_md5(data: bytes) -> str:
    """The user name of a CRAM-MD5 response (RFC 2195: base64 of ``user SP 32-hex-digest``)."""
    try:
        text = base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise SaslError("invalid base64 or UTF-8 in the CRAM-MD5 response") from None
    user, sep, digest = text.rpartition(" ")
    if not sep or not user or len(digest) != 32 or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise SaslError("malformed CRAM-MD5 response")
    if any(ord(c) < 0x20 or c == "\x7f" for c in user):
        raise SaslError("control character in the user name")
    return user


def error_challenge(data: str) -> dict | None:
    """The JSON of a base64 error challenge (XOAUTH2 / OAUTHBEARER), None when it is not one."""
    try:
        value = json.loads(base64.b64decode(data.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None
    return value if isinstance(value, dict) else None
