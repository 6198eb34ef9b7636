"""The filter plugin API: what a filter is called with and what it returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("pop3proxy.filters")


ENTRY_POINT_GROUP = "pop3proxy.filters"
WARNING_HEADER = "X-POP3Proxy-Warning"
ACTIONS = ("deliver", "hold", "quarantine")


@dataclass(frozen=True)
class FilterContext:
    """Who the message is for. ``removed_dir`` is a per-user directory (created on demand by the
    filter) where a filter keeps the parts it removes from a message; None when nothing may be kept.
    (A message kept out of the mailbox as a whole is the ``quarantine`` action, held by the pipeline.)"""

    user: str
    uid: str
    removed_dir: Path | None = None

    @property
    def quarantine_dir(self) -> Path | None:
        """The old name of ``removed_dir``, for filters written before it was renamed."""
        return self.removed_dir


Action = Literal["deliver", "hold", "quarantine"]


@dataclass
class FilterOutcome:
    """What one filter made of a message. ``action`` other than ``deliver`` stops the pipeline."""

    data: bytes
    verdict: str = ""
    action: Action = "deliver"


@dataclass
class FilterResult:
    """What the whole pipeline made of a message."""

    data: bytes
    action: Action = "deliver"
    verdicts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def hold(self) -> bool:
        return self.action != "deliver"


@runtime_checkable
class Filter(Protocol):
    name: str

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome: ...


class FilterConfigError(Exception):
    """A filter named in the configuration cannot be loaded; the message names it."""


class CommonOptions(BaseModel):
    """Options every ``[[filters]]`` table takes besides the filter's own."""

    model_config = ConfigDict(extra="forbid")
    use: str = Field(description="Built-in name, entry point name, or module:Class.")
    on_error: Literal["pass", "hold"] = Field("pass", description="What to do with a message the filter fails on.")
    timeout: float = Field(60.0, gt=0, description="Seconds the filter may spend on one message.")
