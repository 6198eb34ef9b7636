"""Waiting in tests: one way to poll a condition, one way to wait for an event in a text that grows.

``eventually(condition, *, timeout=30.0, message=None, interval=0.05)``
    Calls ``condition()`` until it returns a truthy value, and returns that value. After *timeout*
    seconds it raises ``AssertionError("gave up after 30 s waiting for <message> (last value: ...)")``;
    without *message* the source of *condition* names what was awaited. It sleeps with ``time.sleep``:
    for synchronous tests only (inside trio it would stop the event loop).

``await eventually_async(condition, *, timeout=30.0, message=None, interval=0.05)``
    The same inside trio (it sleeps with ``trio.sleep``); *condition* may also be an async function.

``wait_for(source, pattern, *, timeout=30.0)``
    Waits for an event that shows in a text: a line in a process's output, a server's log. *source* is a
    callable returning the text so far, or an object with ``log_text()`` (Dovecot, the daemons: their log
    file, preferred) or ``output()`` (``helpers.common.ServerProcess``, the proxy fixtures). *pattern* is a ``str``, found literally,
    or a compiled regular expression. Returns the ``re.Match`` (``.string`` is the whole text, ``.group(1)``
    e.g. the port of a "listening on" line). On timeout, ``AssertionError`` names the pattern and shows the
    end of the text.

``await wait_for_async(source, pattern, *, timeout=30.0)``
    The same inside trio.

The default bound of 30 s is generous on purpose: the suite must pass on a loaded machine. A bound is
the most a test waits, never how long it waits; a passing wait returns as soon as the condition holds.
Waiting to show that something does *not* happen is not done with these (nor with a sleep): wait for
the event that shows the code under test has decided (a log line, a finished pass), or use trio's
``autojump_clock`` for code that runs in-process on trio's clock.
"""

from __future__ import annotations

import inspect
import re
import time
from typing import Any, Callable

import trio

DEFAULT_TIMEOUT = 30.0
INTERVAL = 0.05


def _describe(condition: Callable[..., Any], message: str | None) -> str:
    if message:
        return message
    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)


def _gave_up(condition, message: str | None, timeout: float, last: Any) -> AssertionError:
    return AssertionError(f"gave up after {timeout:g} s waiting for {_describe(condition, message)} "
                          f"(last value: {last!r})")


def eventually(condition: Callable[[], Any], *, timeout: float = DEFAULT_TIMEOUT, message: str | None = None,
               interval: float = INTERVAL) -> Any:
    """The first truthy value of ``condition()``, polled every *interval* seconds for at most *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _gave_up(condition, message, timeout, value)
        time.sleep(interval)


async def eventually_async(condition: Callable[[], Any], *, timeout: float = DEFAULT_TIMEOUT,
                           message: str | None = None, interval: float = INTERVAL) -> Any:
    """`eventually` inside trio; *condition* may be a plain or an async function."""
    deadline = trio.current_time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if trio.current_time() >= deadline:
            raise _gave_up(condition, message, timeout, value)
        await trio.sleep(interval)


def _text_of(source) -> Callable[[], str]:
    for name in ("log_text", "output"):  # a daemon's output() shows only the end of its log
        method = getattr(source, name, None)
        if callable(method):
            return method
    if callable(source):
        return source
    raise TypeError(f"wait_for: {source!r} has no output() or log_text() and is not callable")


def _matcher(source, pattern: str | re.Pattern[str]):
    text = _text_of(source)
    regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
    return text, regex


def _not_seen(text, regex, timeout: float) -> AssertionError:
    return AssertionError(f"gave up after {timeout:g} s waiting for {regex.pattern!r} in:\n{text()[-3000:]}")


def wait_for(source, pattern: str | re.Pattern[str], *, timeout: float = DEFAULT_TIMEOUT) -> re.Match[str]:
    """The first match of *pattern* in the text of *source*, once it shows (see the module docstring)."""
    text, regex = _matcher(source, pattern)
    try:
        return eventually(lambda: regex.search(text()), timeout=timeout)
    except AssertionError:
        raise _not_seen(text, regex, timeout) from None


async def wait_for_async(source, pattern: str | re.Pattern[str], *,
                         timeout: float = DEFAULT_TIMEOUT) -> re.Match[str]:
    """`wait_for` inside trio."""
    text, regex = _matcher(source, pattern)
    try:
        return await eventually_async(lambda: regex.search(text()), timeout=timeout)
    except AssertionError:
        raise _not_seen(text, regex, timeout) from None
