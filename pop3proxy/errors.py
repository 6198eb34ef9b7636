"""Errors that cross layers: a configuration problem, a startup failure, a refused login."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, with a message meant for the person who wrote the file."""


class StartupError(Exception):
    """The service cannot start; the message says why, for the person running it."""


class LoginError(Exception):
    """A login that did not succeed; ``code`` is the RFC 3206 response code for the client."""

    def __init__(self, text: str, code: str | None = "AUTH") -> None:
        super().__init__(text)
        self.text = text
        self.code = code
