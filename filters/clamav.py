"""Virus scanning (``use = "clamav"``) with ClamAV's clamd, over TCP or its unix socket.

The whole message goes to clamd with ``zINSTREAM`` (length-prefixed chunks, then a zero length);
clamd decodes the MIME parts itself (base64 attachments, archives) and answers ``stream: OK`` or
``stream: <signature> FOUND``. Every checked message gets a header, on top of the header block
(every other byte stays as it was)::

    X-Virus-Status: Clean
    X-Virus-Status: Infected (Win.Test.EICAR_HDB-1)

An infected message is kept out of the mailbox (``action = "quarantine"``, the default; the pipeline
holds it) or delivered with the header (``action = "tag"``). The verdict names the signature.

clamd refuses a stream longer than its ``StreamMaxLength`` (25 MB unless configured). Set
``max_size`` to the same value: a larger message is then not sent at all, and ``oversize`` decides
what happens to it: ``"error"`` (the default: the pipeline's ``on_error`` policy applies, so it is
delivered with a warning header or held) or ``"skip"`` (delivered with ``X-Virus-Status:
Unscanned``). A clamd that refuses a stream anyway, cannot be reached, does not answer within
``io_timeout`` (the table's ``timeout`` still bounds the whole call), or answers anything else raises
an exception: a message is never called clean
unless clamd said so.
"""

from __future__ import annotations

import re
import socket
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pop3proxy.filtering import Action, FilterContext, FilterOutcome, add_header
from pop3proxy.filters._net import Address, connect, parse_address

HEADER = "X-Virus-Status"
CHUNK = 64 * 1024
MAX_REPLY = 64 * 1024
_FOUND = re.compile(r"^(?:\d+: )?stream: (.+) FOUND$")
_OK = re.compile(r"^(?:\d+: )?stream: OK$")


class ClamdError(Exception):
    """clamd could not be reached, did not answer in time, refused, or answered garbage."""


def parse_reply(reply: bytes) -> str | None:
    """The signature name for ``stream: NAME FOUND``, None for ``stream: OK``; else ClamdError."""
    text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace")
    if _OK.match(text):
        return None
    found = _FOUND.match(text)
    if found:
        return found.group(1).strip()
    if "size limit exceeded" in text.lower():
        raise ClamdError(
            f"clamd refused the message as too large ({text}): raise its StreamMaxLength or lower max_size"
        )
    raise ClamdError(f"clamd could not scan the message: {text[:200]}")


class ClamdClient:
    """One clamd; ``address`` is ``host:port`` or the path of its unix socket."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        self.address: Address = parse_address(address)
        self.timeout = timeout

    def _reply(self, sock: socket.socket) -> bytes:
        data = b""
        while not data.endswith(b"\0"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REPLY:
                raise ClamdError(f"clamd at {self.address}: reply longer than {MAX_REPLY} octets")
        if not data:
            raise ClamdError(f"clamd at {self.address} closed the connection without a reply")
        return data

    def command(self, name: str) -> str:
        """A simple command (``PING``, ``VERSION``); the reply text."""
        with self._connect() as sock:
            try:
                sock.sendall(b"z" + name.encode("ascii") + b"\0")
                return self._reply(sock).rstrip(b"\0").decode("utf-8", "replace")
            except TimeoutError:
                raise ClamdError(f"clamd at {self.address} did not answer within {self.timeout:g} s") from None
            except OSError as exc:
                raise ClamdError(f"clamd at {self.address}: {exc.strerror or exc}") from None

    def _connect(self) -> socket.socket:
        try:
            return connect(self.address, self.timeout)
        except TimeoutError:
            raise ClamdError(
                f"cannot connect to clamd at {self.address}: no answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise ClamdError(f"cannot connect to clamd at {self.address}: {exc.strerror or exc}") from None

    def scan(self, data: bytes) -> str | None:
        """The signature clamd found in ``data``, or None when it is clean."""
        with self._connect() as sock:
            try:
                sock.sendall(b"zINSTREAM\0")
                view = memoryview(data)
                try:
                    for start in range(0, len(view), CHUNK):
                        chunk = view[start:start + CHUNK]
                        sock.sendall(struct.pack(">I", len(chunk)))
                        sock.sendall(chunk)
                    sock.sendall(struct.pack(">I", 0))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # clamd stopped reading (size limit); its reply says why
                return parse_reply(self._reply(sock))
            except TimeoutError:
                raise ClamdError(f"clamd at {self.address} did not answer within {self.timeout:g} s") from None
            except ClamdError:
                raise
            except OSError as exc:
                raise ClamdError(f"clamd at {self.address}: {exc.strerror or exc}") from None


class ClamAVFilter:
    name = "clamav"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        address: str = Field(
            "/run/clamav/clamd.ctl",
            description='clamd\'s unix socket path (Debian\'s default) or "host:port" (clamd\'s TCPSocket).',
        )
        io_timeout: float = Field(
            60.0, gt=0, description="Seconds for the connection, each write, and the wait for the verdict."
        )
        action: Literal["quarantine", "tag"] = Field(
            "quarantine", description="What to do with an infected message: keep it out of the mailbox, or tag it."
        )
        max_size: int = Field(
            25 * 1024 * 1024, gt=0, description="clamd's StreamMaxLength: larger messages are not sent."
        )
        oversize: Literal["error", "skip"] = Field(
            "error",
            description='A message above max_size: "error" (on_error applies) or "skip" (delivered, unscanned).',
        )

        @field_validator("address")
        @classmethod
        def _address(cls, value: str) -> str:
            parse_address(value)
            return value

    def __init__(self, config: ClamAVFilter.Config | None = None) -> None:
        self.config = config = config or self.Config()
        self.client = ClamdClient(config.address, config.io_timeout)

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        if len(message) > self.config.max_size:
            note = f"{len(message)} octets > max_size {self.config.max_size}"
            if self.config.oversize == "error":
                raise ClamdError(f"not scanned: {note}")
            return FilterOutcome(add_header(message, HEADER, "Unscanned"), verdict=f"not scanned: {note}")
        signature = self.client.scan(message)
        if signature is None:
            return FilterOutcome(add_header(message, HEADER, "Clean"), verdict="clean")
        tagged = add_header(message, HEADER, f"Infected ({signature})")
        action: Action = "quarantine" if self.config.action == "quarantine" else "deliver"
        return FilterOutcome(tagged, verdict=f"infected: {signature}", action=action)


FILTER = ClamAVFilter
