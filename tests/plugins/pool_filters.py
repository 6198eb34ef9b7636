"""Small CPU-bound filters for the process-pool tests: the pool processes import them by name."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import BaseModel, Field

from pop3proxy.filtering import FilterContext, FilterOutcome, add_header


class Where:
    """Adds ``X-Pid: <pid>`` of the process that ran it; with ``record``, appends
    "<pid> <start> <end>" to that file after sleeping ``seconds``."""

    name = "where"
    cpu_bound = True

    class Config(BaseModel):
        seconds: float = Field(0.0, ge=0)
        record: str = ""

    def __init__(self, config: Config) -> None:
        self.seconds = config.seconds
        self.record = config.record

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        start = time.monotonic()
        time.sleep(self.seconds)
        if self.record:
            with open(self.record, "a") as f:
                f.write(f"{os.getpid()} {start} {time.monotonic()}\n")
        return FilterOutcome(add_header(message, "X-Pid", str(os.getpid())), verdict=f"pid {os.getpid()}")


class SlowStart:
    """Takes ``seconds`` to build (a slow import or model load in a new pool process), then passes."""

    name = "slowstart"
    cpu_bound = True

    class Config(BaseModel):
        seconds: float = Field(0.0, ge=0)

    def __init__(self, config: Config) -> None:
        time.sleep(config.seconds)

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        return FilterOutcome(message, verdict=f"started {os.getpid()}")


class ThreadWhere(Where):
    """The same, but not CPU-bound: it stays in a thread of the proxy's process."""

    name = "threadwhere"
    cpu_bound = False


class Hang:
    """Writes its pid to ``pidfile``, then computes for ever (only a kill stops it)."""

    name = "hang"
    cpu_bound = True

    class Config(BaseModel):
        pidfile: str

    def __init__(self, config: Config) -> None:
        self.pidfile = Path(config.pidfile)

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        self.pidfile.write_text(str(os.getpid()))
        while True:
            pass


class Crash:
    """Kills its own process: ``how`` = "exit" (os._exit) or "segv" (SIGSEGV)."""

    name = "crash"
    cpu_bound = True

    class Config(BaseModel):
        how: str = "exit"

    def __init__(self, config: Config) -> None:
        self.how = config.how

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        if self.how == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        os._exit(7)


class Raising:
    """Raises, as a filter with a bug does."""

    name = "raising"
    cpu_bound = True

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        raise ValueError("cannot parse this")


class Exiting:
    """Calls sys.exit in its pool process."""

    name = "exiting"
    cpu_bound = True

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        raise SystemExit(3)


class Unpicklable:
    """Returns an outcome that cannot be sent back to the proxy's process."""

    name = "unpicklable"
    cpu_bound = True

    def __call__(self, message: bytes, context: FilterContext):
        return lambda: None


class FifoGate:
    """Holds the message whose Subject is ``subject`` until someone opens and closes the FIFO ``fifo``."""

    name = "fifogate"
    cpu_bound = True

    class Config(BaseModel):
        fifo: str
        subject: str

    def __init__(self, config: Config) -> None:
        self.fifo = config.fifo
        self.subject = f"Subject: {config.subject}\r\n".encode()

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        if self.subject in message:
            with open(self.fifo, "rb") as f:  # blocks until the test opens the other end
                f.read()
            return FilterOutcome(add_header(message, "X-Gate", "passed"))
        return FilterOutcome(message)
