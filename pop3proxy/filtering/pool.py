"""Filters that compute run in a bounded pool of worker processes (trio-parallel), off the GIL.

A filter says it computes with ``cpu_bound = True`` (a class or instance attribute). Nothing
unpicklable crosses the process boundary: the pool process gets the filter's ``[[filters]]`` table,
builds the filter from it once (`load_filter`, memoised per process), and gets the message and the
`FilterContext`; it sends back a small tuple, never the filter's own objects. The pool starts its first
process at the first call, keeps at most ``processes`` of them, lets an idle one exit after
``POOL_IDLE_TIMEOUT`` and closes them all when the trio run that used them ends. A call that overruns its
timeout kills its process; a process that dies (os._exit, a segfault) is replaced at the next call.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_parallel

from pop3proxy.config import usable_cpus
from pop3proxy.filtering.api import ACTIONS, FilterContext, FilterOutcome
from pop3proxy.filtering.loader import load_filter

log = logging.getLogger("pop3proxy.filters")

POOL_IDLE_TIMEOUT = 60.0  # seconds an idle pool process waits for work before it exits
POOL_GRACE_PERIOD = 5.0  # seconds pool processes get to exit at shutdown before they are killed
MAX_BUILT = 32  # filters a pool process keeps built (one per distinct [[filters]] table)
POOL_START_TIMEOUT = 120.0  # seconds a new pool process may take to start and build a filter (beyond: the
# timed call starts it)


def cpu_bound(flt: Any) -> bool:
    """Whether a filter asks to run in the process pool."""
    return getattr(flt, "cpu_bound", False) is True


def resolve_processes(value: int | str) -> int:
    """``filters`` processes as configured: "auto" is the number of CPUs this process may use."""
    if value == "auto":
        return usable_cpus()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"filter processes must be a number >= 0 or 'auto', not {value!r}")
    return value


def check_outcome(outcome: object, before: bytes) -> str:
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


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def table_key(table: dict[str, Any], index: int) -> str:
    """What identifies a filter's configuration across processes."""
    return json.dumps([index, table], sort_keys=True, default=str)


# In a pool process: the filters built so far, by table_key.
_built: dict[str, Any] = {}


def _build(key: str, table: dict[str, Any], index: int) -> Any:
    flt = _built.get(key)
    if flt is None:
        flt = load_filter(dict(table), index)[0]
        if len(_built) >= MAX_BUILT:
            _built.clear()
        _built[key] = flt
    return flt


def build_in_worker(key: str, table: dict[str, Any], index: int) -> str:
    """Run in a pool process: build the filter (memoised) before its timed call; "" or why it failed (the
    call then says so again)."""
    try:
        _build(key, table, index)
    except (Exception, SystemExit) as exc:
        return describe(exc)
    return ""


def call_in_worker(key: str, table: dict[str, Any], index: int, data: bytes, context: FilterContext) -> tuple:
    """Run in a pool process: ("ok", FilterOutcome) or ("error", why). Never raises for a filter's sake."""
    try:
        outcome = _build(key, table, index)(data, context)
    except (Exception, SystemExit) as exc:  # a filter's bug must never cost a message
        return ("error", describe(exc))
    error = check_outcome(outcome, data)
    if error:
        return ("error", error)
    return ("ok", FilterOutcome(bytes(outcome.data), outcome.verdict, outcome.action))


class PoolFilterError(Exception):
    """A pooled filter failed; the message says how, in the words of the thread path."""


@dataclass
class _Holder:
    ready: trio.Event = field(default_factory=trio.Event)
    context: trio_parallel.WorkerContext | None = None


class ProcessPool:
    """At most ``processes`` worker processes, started on demand, per trio run."""

    def __init__(self, processes: int, idle_timeout: float = POOL_IDLE_TIMEOUT) -> None:
        if processes < 1:
            raise ValueError("a process pool needs at least one process")
        self.processes = processes
        self.idle_timeout = idle_timeout
        self.limiter = trio.CapacityLimiter(processes)
        self._context: trio.lowlevel.RunVar = trio.lowlevel.RunVar(f"filter pool {id(self):x}")

    async def _worker_context(self) -> trio_parallel.WorkerContext:
        try:
            holder = self._context.get()
        except LookupError:
            holder = _Holder()
            self._context.set(holder)
            trio.lowlevel.spawn_system_task(self._keep, holder, name="filter process pool")
        await holder.ready.wait()
        if holder.context is None:
            raise PoolFilterError("the filter process pool is shut down")
        return holder.context

    async def _keep(self, holder: _Holder) -> None:
        """Holds the worker context open until the trio run ends, then closes its processes."""
        try:
            async with trio_parallel.open_worker_context(
                idle_timeout=self.idle_timeout, grace_period=POOL_GRACE_PERIOD
            ) as context:
                holder.context = context
                holder.ready.set()
                await trio.sleep_forever()
        except Exception as exc:  # a process that would not exit is killed; nothing else to do
            log.warning("filter process pool: %s", describe(exc))
        finally:
            holder.context = None
            holder.ready.set()

    def statistics(self) -> tuple[int, int]:
        """(running, idle) pool processes in the current trio run."""
        try:
            context = self._context.get().context
        except LookupError:
            return 0, 0
        if context is None:
            return 0, 0
        stats = context.statistics()
        return stats.running_workers, stats.idle_workers

    async def call(self, table: dict[str, Any], index: int, data: bytes, context: FilterContext,
                   timeout: float) -> FilterOutcome:
        """The filter's outcome; raises PoolFilterError or trio.TooSlowError (its process killed)."""
        workers = await self._worker_context()
        # The process slot is taken outside the timeout: waiting for a busy pool is no failure.
        async with self.limiter:
            if workers.statistics().idle_workers == 0:
                # A process is started for this call: its start and the filter's build are not on the
                # filter's time (on a loaded machine a start alone can take longer than the timeout).
                with trio.move_on_after(POOL_START_TIMEOUT):
                    await workers.run_sync(build_in_worker, table_key(table, index), table, index,
                                           kill_on_cancel=True, limiter=contextlib.nullcontext())
            with trio.fail_after(timeout):
                try:
                    status, value = await workers.run_sync(
                        call_in_worker, table_key(table, index), table, index, data, context,
                        kill_on_cancel=True, limiter=contextlib.nullcontext(),
                    )
                except trio_parallel.BrokenWorkerError as exc:
                    proc = exc.args[1] if len(exc.args) > 1 else None
                    code = getattr(proc, "exitcode", None)
                    raise PoolFilterError(
                        "its pool process died" + (f" (exit code {code})" if code is not None else "")
                    ) from None
        if status != "ok":
            raise PoolFilterError(value)
        return value
