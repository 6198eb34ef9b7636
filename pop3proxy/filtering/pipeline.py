"""The filter pipeline: every message through each filter once, in worker threads (or, for filters
that compute, in a pool of worker processes) with a concurrency limit and a per-filter timeout;
`on_error` decides what a failure means.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import trio

from pop3proxy.filtering.api import (
    WARNING_HEADER,
    CommonOptions,
    FilterContext,
    FilterResult,
)
from pop3proxy.filtering.headers import add_header
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filtering.pool import (
    PoolFilterError,
    ProcessPool,
    check_outcome,
    cpu_bound,
    describe,
    resolve_processes,
)
from pop3proxy.ops import metrics

log = logging.getLogger("pop3proxy.filters")

# Worker threads a pipeline may keep busy besides its running filters: threads of filters that timed
# out and were abandoned (a thread cannot be stopped). Past this, further filter calls fail by timeout
# instead of piling up more threads.
MAX_ABANDONED_THREADS = 16


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


class Pipeline:
    """An ordered chain of filters with their failure policies.

    At most ``concurrency`` filter calls run at once in worker threads, across all messages. With
    ``processes`` > 0 and the ``tables`` the filters were built from, a filter that says it is
    ``cpu_bound`` runs in a pool of at most ``processes`` worker processes instead (rebuilt there from its
    table). A filter that overruns its timeout is abandoned (a thread) or killed (a process): its message
    goes on as if the filter had failed.
    """

    def __init__(
        self,
        filters: Sequence[tuple[Any, CommonOptions]] = (),
        concurrency: int = 2,
        *,
        processes: int = 0,
        tables: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        self.filters = list(filters)
        self.limiter = trio.CapacityLimiter(concurrency)
        self._threads = trio.CapacityLimiter(concurrency + MAX_ABANDONED_THREADS)
        # Per filter: its table when it runs in the pool, else None.
        self._pooled: list[dict[str, Any] | None] = [None] * len(self.filters)
        if processes > 0 and tables is not None and len(tables) == len(self.filters):
            self._pooled = [dict(table) if cpu_bound(flt) else None
                            for table, (flt, _) in zip(tables, self.filters, strict=True)]
        self.pool = ProcessPool(processes) if any(t is not None for t in self._pooled) else None
        self.concurrency = concurrency

    @property
    def parallelism(self) -> int:
        """How many messages are worth filtering at once."""
        return max(self.concurrency, self.pool.processes if self.pool is not None else 0)

    def __bool__(self) -> bool:
        return bool(self.filters)

    @property
    def names(self) -> list[str]:
        return [getattr(flt, "name", options.use) for flt, options in self.filters]

    async def _call(self, index: int, flt: Any, name: str, data: bytes, context: FilterContext,
                    timeout: float) -> Any:
        """The filter's return value; raises what it raised, PoolFilterError, or trio.TooSlowError."""
        table = self._pooled[index]
        if table is not None and self.pool is not None:
            return await self.pool.call(table, index, data, context, timeout)
        # The concurrency slot is taken outside the timeout (waiting for a busy pipeline is no failure)
        # and given back as soon as the call returns or is abandoned.
        async with self.limiter:
            with trio.fail_after(timeout):
                return await trio.to_thread.run_sync(
                    flt, data, context, limiter=self._threads, **_thread_options(f"filter {name}")
                )

    async def run(self, data: bytes, context: FilterContext) -> FilterResult:
        result = FilterResult(data)
        for index, (flt, options) in enumerate(self.filters):
            name = getattr(flt, "name", options.use)
            outcome: Any = None
            error = ""
            try:
                outcome = await self._call(index, flt, name, result.data, context, options.timeout)
            except trio.TooSlowError:
                error = f"timed out after {options.timeout:g} s"
            except PoolFilterError as exc:
                error = str(exc)
            except (Exception, SystemExit) as exc:  # a filter's bug must never cost a message
                error = describe(exc)
            else:
                error = check_outcome(outcome, result.data)
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


def build_pipeline(
    tables: Sequence[dict[str, Any]], concurrency: int = 2, processes: int | str = "auto"
) -> Pipeline:
    """The pipeline the configuration asks for; a filter that cannot be loaded is a startup error.

    ``processes``: at most this many pool processes for CPU-bound filters; 0 runs every filter in a
    thread; "auto" is one per CPU (a caller running several server processes passes its share)."""
    filters = [load_filter(dict(table), index) for index, table in enumerate(tables)]
    return Pipeline(filters, concurrency, processes=resolve_processes(processes), tables=tables)
