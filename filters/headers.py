"""The ``headers`` filter: remove header fields by name pattern, add fixed ones.

::

    [[filters]]
    use = "headers"
    remove = ["X-Tracking-*", "X-Mailgun-*"]   # case-insensitive globs on field names
    add = { "X-Filtered-By" = "pop3proxy" }

A removed field goes with all its folded continuation lines; added fields appear at the top of the
message, in the order given. Every other byte of the message stays exactly as it was, so signatures over
the remaining headers and the body (DKIM) still verify. Removal happens before adding: to replace a field
that may already be present, list it in both.

This module is also the example to copy for a filter of your own: a ``name``, a pydantic ``Config``,
an ``__init__`` that takes the validated config, and a call that returns a ``FilterOutcome``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pop3proxy.filtering import (
    FilterContext,
    FilterOutcome,
    add_header,
    format_header,
    remove_headers,
)


class HeadersFilter:
    name = "headers"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        remove: list[str] = Field(
            default_factory=list, description="Glob patterns of header names to remove (case-insensitive)."
        )
        add: dict[str, str] = Field(default_factory=dict, description="Header fields to add at the top.")

        @field_validator("remove")
        @classmethod
        def _patterns(cls, value: list[str]) -> list[str]:
            for pattern in value:
                if not pattern or not pattern.isascii() or any(c in pattern for c in ": \t\r\n"):
                    raise ValueError(f"{pattern!r} is not a header name pattern")
            return value

        @field_validator("add")
        @classmethod
        def _fields(cls, value: dict[str, str]) -> dict[str, str]:
            for name, text in value.items():
                format_header(name, text)  # raises ValueError for a bad name
            return value

    def __init__(self, config: Config) -> None:
        self.remove = list(config.remove)
        self.add = dict(config.add)

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        data, removed = remove_headers(message, self.remove) if self.remove else (message, [])
        for name, value in reversed(self.add.items()):  # the first one configured ends up on top
            data = add_header(data, name, value)
        said = []
        if removed:
            said.append("removed " + ", ".join(removed))
        if self.add:
            said.append("added " + ", ".join(self.add))
        return FilterOutcome(data, verdict="; ".join(said))


FILTER = HeadersFilter
