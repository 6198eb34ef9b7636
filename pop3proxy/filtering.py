"""The filter pipeline: every new message passes through it once, before it is cached.

A filter gets the raw message bytes and a context (user, upstream UIDL) and returns the bytes to cache
(possibly changed) and whether to hold the message back. With no filters configured the pipeline is the
identity: the cached copy is byte-for-byte what the provider sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class FilterContext:
    user: str
    uid: str


@dataclass
class FilterResult:
    data: bytes
    hold: bool = False
    verdicts: list[str] = field(default_factory=list)


class FilterConfigError(Exception):
    """A filter named in the configuration cannot be loaded; the message names it."""


class Pipeline:
    def __init__(self, filters: Sequence[Any] = ()) -> None:
        self.filters = list(filters)

    async def run(self, data: bytes, context: FilterContext) -> FilterResult:
        result = FilterResult(data)
        for flt in self.filters:
            result = await flt(result.data, context)
        return result


def build_pipeline(tables: Sequence[dict[str, Any]]) -> Pipeline:
    """The pipeline the configuration asks for; an unknown filter is a startup error."""
    for index, table in enumerate(tables):
        raise FilterConfigError(f"filters[{index}]: unknown filter {table.get('use')!r}")
    return Pipeline()
