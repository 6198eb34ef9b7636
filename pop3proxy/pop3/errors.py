"""Errors of the sans-IO POP3 core: whose fault it is (h11-style)."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of this module's errors."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid.

    `reply` is the complete `-ERR ...` line a server sends back; it is empty when
    the error was found by the client side.
    """

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """This program misused the API (a bug here, not the peer's fault)."""
