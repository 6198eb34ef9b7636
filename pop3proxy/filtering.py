"""The filter pipeline: every new message passes through it once, before it is cached.

A filter is a class with a ``name``, a pydantic ``Config`` model for its own options, and a call that
takes the raw message bytes plus a ``FilterContext`` and returns a ``FilterOutcome`` (the bytes to keep,
a verdict line, and an action). Filters are synchronous and run in worker threads, a few at a time, so a
big message never stalls other sessions::

    class Shout:
        name = "shout"

        class Config(pydantic.BaseModel):
            word: str = "HELLO"

        def __init__(self, config: Config) -> None:
            self.word = config.word

        def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
            return FilterOutcome(add_header(message, "X-Shout", self.word), verdict="shouted")

Where a filter comes from (``use`` in a ``[[filters]]`` table): a built-in module of the top-level
``filters`` package (``use = "spam"``), an entry point in group ``pop3proxy.filters``, or ``module:Class``.
Every filter table also takes ``on_error`` (``"pass"``: deliver unchanged with an
``X-POP3Proxy-Warning:`` header; ``"hold"``: keep it out of the mailbox for ``pop3proxy held``) and
``timeout`` (seconds). A filter that cannot be loaded, or a bad option, fails at startup, naming it.
With no filters configured the pipeline is the identity: the cached copy is what the provider sent.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("pop3proxy.filters")

ENTRY_POINT_GROUP = "pop3proxy.filters"
WARNING_HEADER = "X-POP3Proxy-Warning"


@dataclass(frozen=True)
class FilterContext:
    """Who the message is for. ``quarantine_dir`` is a per-user directory (created on demand by the
    filter) where a filter keeps what it removes from a message; None when nothing may be kept."""

    user: str
    uid: str
    quarantine_dir: Path | None = None


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


# -- byte-exact header editing -------------------------------------------------------------------

_HEADER_NAME = re.compile(rb"^[!-9;-~]+$")


def header_end(message: bytes) -> int:
    """Offset of the blank line that ends the header block (or len(message) if there is none)."""
    if message.startswith((b"\r\n", b"\n")):
        return 0
    match = re.search(rb"\r?\n\r?\n", message)
    return match.start() + (2 if message[match.start()] == 0x0D else 1) if match else len(message)


def line_ending(message: bytes) -> bytes:
    """The message's own line ending (CRLF unless its first line ends with a bare LF)."""
    first = message.find(b"\n")
    return b"\n" if first > 0 and message[first - 1] != 0x0D else b"\r\n"


def _clean(value: str) -> str:
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def add_header(message: bytes, name: str, value: str) -> bytes:
    """Prepend ``name: value``; every other byte of the message stays as it was."""
    if not _HEADER_NAME.match(name.encode("ascii", "replace")):
        raise ValueError(f"invalid header name {name!r}")
    eol = line_ending(message)
    return f"{name}: {_clean(value)}".encode("utf-8") + eol + message


# -- loading ---------------------------------------------------------------------------------------


def _resolve(use: str) -> type:
    """The filter class named by ``use``."""
    if ":" in use:
        module_name, _, attr = use.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise FilterConfigError(f"filter {use!r}: cannot import {module_name}: {exc}") from None
        try:
            return getattr(module, attr)
        except AttributeError:
            raise FilterConfigError(f"filter {use!r}: {module_name} has no {attr}") from None
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == use:
            try:
                return ep.load()
            except Exception as exc:
                raise FilterConfigError(f"filter {use!r}: cannot load entry point {ep.value}: {exc}") from None
    if re.fullmatch(r"[a-z][a-z0-9_]*", use):
        try:
            module = importlib.import_module(f"filters.{use}")
        except ModuleNotFoundError as exc:
            if exc.name != f"filters.{use}":
                raise FilterConfigError(f"filter {use!r}: cannot import {exc.name}") from None
        except Exception as exc:
            raise FilterConfigError(f"filter {use!r}: cannot import: {exc}") from None
        else:
            cls = getattr(module, "FILTER", None)
            if cls is None:
                raise FilterConfigError(f"filter {use!r}: filters.{use} defines no FILTER class")
            return cls
    raise FilterConfigError(f"unknown filter {use!r} (not built in, no entry point, not module:Class)")


def load_filter(table: dict[str, Any], index: int = 0) -> tuple["Filter", CommonOptions]:
    """Build one filter from its ``[[filters]]`` table; every problem names the filter."""
    where = f"filters[{index}]"
    common_keys = set(CommonOptions.model_fields)
    try:
        common = CommonOptions(**{k: v for k, v in table.items() if k in common_keys})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise FilterConfigError(f"{where}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    cls = _resolve(common.use)
    name = getattr(cls, "name", None)
    config_model = getattr(cls, "Config", None)
    if not isinstance(name, str) or not callable(cls):
        raise FilterConfigError(f"{where} ({common.use}): not a filter class (it needs a 'name' and a call)")
    if config_model is not None and not (inspect.isclass(config_model) and issubclass(config_model, BaseModel)):
        raise FilterConfigError(f"{where} ({common.use}): its Config is not a pydantic model")
    options = {k: v for k, v in table.items() if k not in common_keys}
    try:
        if config_model is None:
            if options:
                raise FilterConfigError(f"{where} ({common.use}): unknown option(s) {', '.join(sorted(options))}")
            instance = cls()
        else:
            strict = config_model.model_config.get("extra") is None
            model = config_model.model_validate(options)
            if strict:
                unknown = set(options) - set(config_model.model_fields)
                if unknown:
                    raise FilterConfigError(
                        f"{where} ({common.use}): unknown option(s) {', '.join(sorted(unknown))}"
                    )
            instance = cls(model)
    except FilterConfigError:
        raise
    except ValidationError as exc:
        first = exc.errors()[0]
        raise FilterConfigError(
            f"{where} ({common.use}).{'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None
    except Exception as exc:
        raise FilterConfigError(f"{where} ({common.use}): cannot start: {exc}") from None
    if not callable(instance):
        raise FilterConfigError(f"{where} ({common.use}): instances are not callable")
    return instance, common


# -- the pipeline ----------------------------------------------------------------------------------


def _run_in_thread(fn: Callable, *args: Any, limiter: trio.CapacityLimiter) -> Any:
    params = inspect.signature(trio.to_thread.run_sync).parameters
    flag = "abandon_on_cancel" if "abandon_on_cancel" in params else "cancellable"
    return trio.to_thread.run_sync(fn, *args, limiter=limiter, **{flag: True})


class Pipeline:
    """An ordered chain of filters with their failure policies."""

    def __init__(self, filters: Sequence[tuple[Any, CommonOptions]] = (), concurrency: int = 2) -> None:
        self.filters = list(filters)
        self.limiter = trio.CapacityLimiter(concurrency)

    def __bool__(self) -> bool:
        return bool(self.filters)

    async def run(self, data: bytes, context: FilterContext) -> FilterResult:
        result = FilterResult(data)
        for flt, options in self.filters:
            name = getattr(flt, "name", options.use)
            outcome: FilterOutcome | None = None
            error = ""
            with trio.move_on_after(options.timeout) as scope:
                try:
                    outcome = await _run_in_thread(flt, result.data, context, limiter=self.limiter)
                except Exception as exc:  # a filter's bug must never cost a message
                    error = f"{type(exc).__name__}: {exc}"
            if scope.cancelled_caught:
                error = f"timed out after {options.timeout:g} s"
            if outcome is not None and not isinstance(outcome, FilterOutcome):
                error, outcome = f"returned {type(outcome).__name__}, not a FilterOutcome", None
            if outcome is None:
                log.warning("filter %s failed on %s of %r: %s", name, context.uid, context.user, error)
                result.errors.append(f"{name}: {error}")
                if options.on_error == "hold":
                    result.action = "hold"
                    return result
                result.data = add_header(result.data, WARNING_HEADER, f"filter {name} failed: {error}")
                continue
            result.data = outcome.data
            if outcome.verdict:
                result.verdicts.append(f"{name}: {outcome.verdict}")
            if outcome.action != "deliver":
                result.action = outcome.action
                return result
        return result

    def run_sync(self, data: bytes, context: FilterContext) -> FilterResult:
        """Run the pipeline outside trio (the ``pop3proxy filter`` command)."""
        return trio.run(self.run, data, context)


def build_pipeline(tables: Sequence[dict[str, Any]]) -> Pipeline:
    """The pipeline the configuration asks for; a filter that cannot be loaded is a startup error."""
    return Pipeline([load_filter(dict(table), index) for index, table in enumerate(tables)])
