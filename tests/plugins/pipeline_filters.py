"""Small filters for the pipeline tests: each shows one behaviour of the pipeline."""

from __future__ import annotations

import threading
import time

from pydantic import BaseModel, Field

from pop3proxy.filtering import FilterContext, FilterOutcome, add_header

# Set by the tests when they are done, so that an abandoned slow filter thread ends promptly.
release_sleepers = threading.Event()


class Tag:
    """Adds ``X-Tag: <label>`` and records which thread ran it."""

    name = "tag"
    calls: list[tuple[str, int]] = []

    class Config(BaseModel):
        label: str = "tagged"
        verdict: str = ""

    def __init__(self, config: Config) -> None:
        self.label = config.label
        self.verdict = config.verdict

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        Tag.calls.append((self.label, threading.get_ident()))
        return FilterOutcome(add_header(message, "X-Tag", self.label), verdict=self.verdict)


class Sleepy:
    """Sleeps (until released), then passes the message unchanged."""

    name = "sleepy"
    threads: list[int] = []

    class Config(BaseModel):
        seconds: float = Field(0.3, ge=0)

    def __init__(self, config: Config) -> None:
        self.seconds = config.seconds

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        Sleepy.threads.append(threading.get_ident())
        if self.seconds >= 5:  # long enough to be abandoned: wait until the test lets it go
            release_sleepers.wait(self.seconds)
        else:
            time.sleep(self.seconds)
        return FilterOutcome(message, verdict="slept")


class Failing:
    """Raises, as a filter with a bug (or a dead backend) does."""

    name = "failing"

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        raise ConnectionRefusedError("backend at 127.0.0.1:9 refused the connection")


class Exiting:
    """Calls sys.exit: even that must not stop the pipeline."""

    name = "exiting"

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        raise SystemExit(3)


class Garbage:
    """Returns something that is not a usable FilterOutcome."""

    name = "garbage"

    class Config(BaseModel):
        kind: str = "string"

    def __init__(self, config: Config) -> None:
        self.kind = config.kind

    def __call__(self, message: bytes, context: FilterContext):
        if self.kind == "string":
            return "looks fine to me"
        if self.kind == "none":
            return None
        if self.kind == "text-data":
            return FilterOutcome(message.decode("latin-1"))  # type: ignore[arg-type]
        if self.kind == "empty":
            return FilterOutcome(b"")
        if self.kind == "action":
            return FilterOutcome(message, action="discard")  # type: ignore[arg-type]
        raise AssertionError(self.kind)


class Quarantine:
    """Quarantines every message (as a spam filter does with spam)."""

    name = "quarantine"

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        return FilterOutcome(message, verdict="spam (score 12.5)", action="quarantine")


class BadInit:
    """Cannot start: its backend is not there."""

    name = "badinit"

    class Config(BaseModel):
        address: str = "127.0.0.1:9"

    def __init__(self, config: Config) -> None:
        raise RuntimeError(f"no spamd at {config.address}")


class NoName:
    """Not a filter: it has no ``name``."""

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        return FilterOutcome(message)


class WrongCall:
    """Not a filter: its call takes the wrong arguments."""

    name = "wrongcall"

    def __call__(self, message: bytes) -> FilterOutcome:
        return FilterOutcome(message)


def not_a_class(message: bytes, context: FilterContext) -> FilterOutcome:
    return FilterOutcome(message)


class WithSecret:
    """A filter with a secret option, to check that check-config masks it."""

    name = "with_secret"

    class Config(BaseModel):
        password: str

    def __init__(self, config: "WithSecret.Config") -> None:
        self.password = config.password

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        return FilterOutcome(message)


# Opened by the tests: until then the Gate filter holds every message (a sync stays in progress).
gate = threading.Event()


class Gate:
    """Passes each message unchanged once ``gate`` is set (at most 30 s)."""

    name = "gate"

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        gate.wait(30)
        return FilterOutcome(message)
