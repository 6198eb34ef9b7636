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

Mail bytes are sacred: ``add_header`` and ``remove_headers`` edit the header block and leave every other
byte as it was (folding, 8-bit octets, invalid UTF-8, mixed line endings, DKIM signatures).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from email.header import Header
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable, Literal, Protocol, Sequence, runtime_checkable

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pop3proxy import metrics

log = logging.getLogger("pop3proxy.filters")

ENTRY_POINT_GROUP = "pop3proxy.filters"
WARNING_HEADER = "X-POP3Proxy-Warning"
ACTIONS = ("deliver", "hold", "quarantine")
# Worker threads a pipeline may keep busy besides its running filters: threads of filters that timed
# out and were abandoned (a thread cannot be stopped). Past this, further filter calls fail by timeout
# instead of piling up more threads.
MAX_ABANDONED_THREADS = 16


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

_HEADER_NAME = re.compile(rb"[!-9;-~]+")
_MAX_LINE = 78  # where added header lines are folded (RFC 5322 2.1.1)


@dataclass(frozen=True)
class HeaderField:
    """One field of a header block, exactly as it is in the message.

    ``raw`` holds the field's octets with its continuation lines and line endings. ``name`` is the field
    name (decoded as Latin-1, so any octet survives), or None for a line that is not a header field (no
    colon, or octets that cannot be part of a name).
    """

    name: str | None
    raw: bytes


def _lines(data: bytes, start: int = 0) -> Iterable[tuple[int, int]]:
    """(start, end) of each line; a line ends just after LF (a CR before it belongs to the line)."""
    size = len(data)
    while start < size:
        end = data.find(b"\n", start)
        end = size if end < 0 else end + 1
        yield start, end
        start = end


def _field_name(line: bytes) -> str | None:
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")  # RFC 5322 obsolete syntax allows blanks before the colon
    return name.decode("latin-1") if _HEADER_NAME.fullmatch(name) else None


def split_header(message: bytes) -> tuple[list[HeaderField], bytes]:
    """The header block as fields, and the rest (the blank line and the body, or b"").

    ``b"".join(f.raw for f in fields) + rest == message`` always holds. The header block ends at the first
    empty line (CRLF or a bare LF); a line starting with a space or a tab continues the field before it.
    """
    fields: list[HeaderField] = []
    pos = 0
    for start, end in _lines(message):
        line = message[start:end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = HeaderField(fields[-1].name, fields[-1].raw + line)
        else:
            fields.append(HeaderField(_field_name(line), line))
        pos = end
    return fields, message[pos:]


def header_end(message: bytes) -> int:
    """Offset of the blank line that ends the header block (or len(message) if there is none)."""
    fields, rest = split_header(message)
    return len(message) - len(rest)


def line_ending(message: bytes) -> bytes:
    """The message's own line ending (CRLF unless its first line ends with a bare LF)."""
    first = message.find(b"\n")
    return b"\n" if first == 0 or (first > 0 and message[first - 1] != 0x0D) else b"\r\n"


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str) -> str:
    """One line of text: control characters, line breaks and runs of blanks become single spaces."""
    return " ".join(_CONTROLS.sub(" ", value).split())


def _check_name(name: str) -> None:
    if not name.isascii() or not _HEADER_NAME.fullmatch(name.encode("ascii")):
        raise ValueError(f"invalid header name {name!r}")


def _fold(name: str, value: str) -> list[str]:
    """``name: value`` as physical lines of at most 78 characters where the words allow it."""
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        while len(word) > 900:  # a single word never pushes a line past RFC 5322's 998 octets
            lines.append(current)
            current, word = f" {word[:900]}", word[900:]
        if len(current) + 1 + len(word) > _MAX_LINE and current.strip() and current != f"{name}:":
            lines.append(current)
            current = f" {word}"
        else:
            current += f" {word}"
    lines.append(current)
    return lines


def format_header(name: str, value: str, eol: bytes = b"\r\n") -> bytes:
    """One header field ready to put into a message: folded, ``eol``-terminated, 7-bit.

    A value with non-ASCII characters (or with text that a reader would take for an encoded word) is
    written as RFC 2047 encoded words (UTF-8); control characters, line breaks and runs of blanks in the
    value become single spaces.
    """
    _check_name(name)
    value = _clean(value)
    if value.isascii() and "=?" not in value:
        lines = _fold(name, value)
    else:
        encoded = Header(value, "utf-8", maxlinelen=_MAX_LINE, header_name=name).encode(linesep="\n")
        lines = f"{name}: {encoded}".split("\n")
    return eol.join(line.encode("ascii") for line in lines) + eol


def add_header(message: bytes, name: str, value: str) -> bytes:
    """Prepend ``name: value``; every other byte of the message stays as it was."""
    return format_header(name, value, line_ending(message)) + message


def remove_headers(message: bytes, patterns: Iterable[str]) -> tuple[bytes, list[str]]:
    """Drop every header field whose name matches one of the glob ``patterns`` (case-insensitive).

    A field goes with all its continuation lines; every other byte stays as it was. Returns the new
    message and the names of the removed fields, in message order.
    """
    globs = [pattern.lower() for pattern in patterns]
    fields, rest = split_header(message)
    kept: list[bytes] = []
    removed: list[str] = []
    for fld in fields:
        if fld.name is not None and any(fnmatch.fnmatchcase(fld.name.lower(), g) for g in globs):
            removed.append(fld.name)
        else:
            kept.append(fld.raw)
    if not removed:
        return message, []
    return b"".join(kept) + rest, removed


# -- describing what a pipeline changed --------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_SHOW_MAX = 200


def _printable(raw: bytes) -> str:
    """A header line for a terminal: control characters escaped, long lines shortened."""
    text = raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace").replace("\r", "\\r")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _body(rest: bytes) -> bytes:
    """The body: what follows the blank line after the header block."""
    return rest[2:] if rest.startswith(b"\r\n") else rest[1:] if rest.startswith(b"\n") else rest


def change_summary(before: bytes, after: bytes) -> list[str]:
    """Lines telling what changed between two versions of a message, for people.

    The size, each header line removed (``- ``) or added (``+ ``), and whether the body changed. The
    body itself is never shown.
    """
    lines = [f"size: {len(before)} -> {len(after)} bytes"]
    old_fields, old_rest = split_header(before)
    new_fields, new_rest = split_header(after)
    old_rest, new_rest = _body(old_rest), _body(new_rest)
    old_raw, new_raw = [f.raw for f in old_fields], [f.raw for f in new_fields]
    diff: list[str] = []
    matcher = difflib.SequenceMatcher(None, old_raw, new_raw, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for sign, chunk in (("-", old_raw[i1:i2]), ("+", new_raw[j1:j2])):
            for raw in chunk:
                for start, end in _lines(raw):
                    diff.append(f"  {sign} {_printable(raw[start:end])}")
    lines += ["headers changed:", *diff] if diff else ["headers unchanged"]
    if old_rest == new_rest:
        lines.append("body unchanged")
    else:
        detail = f"{len(old_rest)} -> {len(new_rest)} bytes"
        if len(old_rest) + len(new_rest) <= 4 << 20:
            old_lines, new_lines = old_rest.splitlines(True), new_rest.splitlines(True)
            body = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
            removed = added = 0
            for tag, i1, i2, j1, j2 in body.get_opcodes():
                if tag != "equal":
                    removed += i2 - i1
                    added += j2 - j1
            detail += f", {removed} lines removed, {added} added"
        lines.append(f"body changed ({detail})")
    return lines


# -- loading ---------------------------------------------------------------------------------------


def _import_error(use: str, module_name: str, exc: BaseException) -> FilterConfigError:
    return FilterConfigError(f"filter {use!r}: cannot import {module_name}: {type(exc).__name__}: {exc}")


def _resolve(use: str) -> Any:
    """The filter class named by ``use``: module:Class, else a built-in, else an entry point."""
    if ":" in use:
        module_name, _, attr = use.partition(":")
        if not module_name or not attr:
            raise FilterConfigError(f"filter {use!r}: expected module:Class")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise _import_error(use, module_name, exc) from None
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise FilterConfigError(f"filter {use!r}: {module_name} has no {attr}") from None
        return obj
    if re.fullmatch(r"[a-z][a-z0-9_]*", use):
        # Built-ins first: an installed package cannot silently replace one.
        try:
            module = importlib.import_module(f"filters.{use}")
        except ModuleNotFoundError as exc:
            if exc.name not in ("filters", f"filters.{use}"):
                raise _import_error(use, f"filters.{use}", exc) from None
        except Exception as exc:
            raise _import_error(use, f"filters.{use}", exc) from None
        else:
            cls = getattr(module, "FILTER", None)
            if cls is None:
                raise FilterConfigError(f"filter {use!r}: filters.{use} defines no FILTER class")
            return cls
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == use:
            try:
                return ep.load()
            except Exception as exc:
                raise FilterConfigError(
                    f"filter {use!r}: cannot load entry point {ep.value}: {type(exc).__name__}: {exc}"
                ) from None
    raise FilterConfigError(f"unknown filter {use!r} (not built in, no entry point, not module:Class)")


def _first_error(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    return ".".join(map(str, first["loc"])), first["msg"]


def load_filter(table: dict[str, Any], index: int = 0) -> tuple["Filter", CommonOptions]:
    """Build one filter from its ``[[filters]]`` table; every problem names the filter."""
    where = f"filters[{index}]"
    common_keys = set(CommonOptions.model_fields)
    try:
        common = CommonOptions(**{k: v for k, v in table.items() if k in common_keys})
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        raise FilterConfigError(f"{where}.{loc}: {msg}") from None
    label = f"{where} ({common.use})"
    try:
        cls = _resolve(common.use)
    except FilterConfigError as exc:
        raise FilterConfigError(f"{where}: {exc}") from None
    name = getattr(cls, "name", None)
    config_model = getattr(cls, "Config", None)
    if not inspect.isclass(cls) or not isinstance(name, str) or not name:
        raise FilterConfigError(f"{label}: not a filter class (it needs a 'name' and a call)")
    if config_model is not None and not (inspect.isclass(config_model) and issubclass(config_model, BaseModel)):
        raise FilterConfigError(f"{label}: its Config is not a pydantic model")
    options = {k: v for k, v in table.items() if k not in common_keys}
    try:
        if config_model is None:
            if options:
                raise FilterConfigError(f"{label}: unknown option(s) {', '.join(sorted(options))}")
            instance = cls()
        else:
            lenient = config_model.model_config.get("extra") in (None, "ignore")
            if lenient:  # pydantic would drop a misspelt option silently
                unknown = set(options) - set(config_model.model_fields)
                unknown -= {f.alias for f in config_model.model_fields.values() if f.alias}
                if unknown:
                    raise FilterConfigError(f"{label}: unknown option(s) {', '.join(sorted(unknown))}")
            model = config_model.model_validate(options)
            instance = cls(model)
    except FilterConfigError:
        raise
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        raise FilterConfigError(f"{label}.{loc}: {msg}" if loc else f"{label}: {msg}") from None
    except Exception as exc:
        raise FilterConfigError(f"{label}: cannot start: {type(exc).__name__}: {exc}") from None
    if not callable(instance):
        raise FilterConfigError(f"{label}: instances are not callable")
    try:
        inspect.signature(instance).bind(b"", FilterContext(user="", uid=""))
    except TypeError:
        raise FilterConfigError(f"{label}: its call must take (message, context)") from None
    except ValueError:  # no signature to inspect (a builtin): it will show at the first message
        pass
    return instance, common


# -- the pipeline ----------------------------------------------------------------------------------


@functools.cache
def _to_thread_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(trio.to_thread.run_sync).parameters)


def _thread_options(thread_name: str) -> dict[str, Any]:
    """Keyword arguments for trio.to_thread.run_sync that abandon the thread on cancellation."""
    params = _to_thread_parameters()
    options: dict[str, Any] = {"abandon_on_cancel" if "abandon_on_cancel" in params else "cancellable": True}
    if "thread_name" in params:
        options["thread_name"] = thread_name
    return options


def _check_outcome(outcome: object, before: bytes) -> str:
    """Why a filter's return value is unusable, or "" if it is fine."""
    if not isinstance(outcome, FilterOutcome):
        return f"returned {type(outcome).__name__}, not a FilterOutcome"
    if not isinstance(outcome.data, (bytes, bytearray, memoryview)):
        return f"returned data of type {type(outcome.data).__name__}, not bytes"
    if before and not outcome.data:
        return "returned an empty message"
    if outcome.action not in ACTIONS:
        return f"returned the unknown action {outcome.action!r}"
    if not isinstance(outcome.verdict, str):
        return f"returned a verdict of type {type(outcome.verdict).__name__}, not str"
    return ""


class Pipeline:
    """An ordered chain of filters with their failure policies.

    At most ``concurrency`` filter calls run at once (in worker threads, across all messages). A filter
    that overruns its timeout is abandoned: its message goes on as if the filter had failed.
    """

    def __init__(self, filters: Sequence[tuple[Any, CommonOptions]] = (), concurrency: int = 2) -> None:
        self.filters = list(filters)
        self.limiter = trio.CapacityLimiter(concurrency)
        self._threads = trio.CapacityLimiter(concurrency + MAX_ABANDONED_THREADS)

    def __bool__(self) -> bool:
        return bool(self.filters)

    @property
    def names(self) -> list[str]:
        return [getattr(flt, "name", options.use) for flt, options in self.filters]

    async def _call(self, flt: Any, name: str, data: bytes, context: FilterContext, timeout: float) -> Any:
        """The filter's return value; raises what it raised, or trio.TooSlowError."""
        # The concurrency slot is taken outside the timeout (waiting for a busy pipeline is no failure)
        # and given back as soon as the call returns or is abandoned.
        async with self.limiter:
            with trio.fail_after(timeout):
                return await trio.to_thread.run_sync(
                    flt, data, context, limiter=self._threads, **_thread_options(f"filter {name}")
                )

    async def run(self, data: bytes, context: FilterContext) -> FilterResult:
        result = FilterResult(data)
        for flt, options in self.filters:
            name = getattr(flt, "name", options.use)
            outcome: Any = None
            error = ""
            try:
                outcome = await self._call(flt, name, result.data, context, options.timeout)
            except trio.TooSlowError:
                error = f"timed out after {options.timeout:g} s"
            except (Exception, SystemExit) as exc:  # a filter's bug must never cost a message
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                error = _check_outcome(outcome, result.data)
            if error:
                log.warning("filter %s failed on %s of %r: %s", name, context.uid, context.user, error)
                result.errors.append(f"{name}: {error}")
                metrics.filter_error(name)
                # Marked either way, so a held message that is released later still says so.
                result.data = add_header(result.data, WARNING_HEADER, f"filter {name} failed: {error}")
                if options.on_error == "hold":
                    result.action = "hold"
                    return result
                continue
            result.data = bytes(outcome.data)
            metrics.filter_verdict(name, outcome.action)
            if outcome.verdict:
                result.verdicts.append(f"{name}: {outcome.verdict}")
            if outcome.action != "deliver":
                result.action = outcome.action
                return result
        return result

    def run_sync(self, data: bytes, context: FilterContext) -> FilterResult:
        """Run the pipeline outside trio (the ``pop3proxy filter`` command)."""
        return trio.run(self.run, data, context)


def build_pipeline(tables: Sequence[dict[str, Any]], concurrency: int = 2) -> Pipeline:
    """The pipeline the configuration asks for; a filter that cannot be loaded is a startup error."""
    return Pipeline([load_filter(dict(table), index) for index, table in enumerate(tables)], concurrency)
