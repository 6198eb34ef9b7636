"""Errors that cross layers: a configuration problem, a startup failure, a refused login."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, with a message meant for the person who wrote the file."""


class StartupError(Exception):
    """The service cannot start; the message says why, for the person running it."""


class ListenError(StartupError):
    """A listening socket cannot be opened (the port is in use, not allowed): the configuration's
    fault, so the command exits 2 like any other usage error."""


class LoginError(Exception):
    """A login that did not succeed; ``code`` is the RFC 3206 response code for the client."""

    def __init__(self, text: str, code: str | None = "AUTH", *, guess: bool = False, verified: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        # The password was right and the login fails for another reason (an OAuth2 account that needs
        # authorisation again): not a failed guess, whatever the code says.
        self.verified = verified
        # A password was tried even though the answer is not [AUTH] (the provider took it and did not
        # answer in time): the throttle counts it like a refused one.
        self.guess = guess


def sole_exception(exc: BaseException) -> BaseException:
    """What an exception group holding a single exception (nested any depth, as trio's nurseries make
    them) holds; any other exception as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
