"""CPU-bound filters in a pool of worker processes: same results as in threads, and every promise of the
pipeline (timeout, failures, bounded processes) kept when a filter runs in another process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio
from helpers.waiting import eventually, eventually_async

from pop3proxy.config import Settings
from pop3proxy.errors import ConfigError
from pop3proxy.filtering.api import WARNING_HEADER, FilterContext
from pop3proxy.filtering.pipeline import Pipeline, build_pipeline
from pop3proxy.filtering.pool import resolve_processes
from pop3proxy.filters._bayes import Bayes, iter_messages

TESTS = Path(__file__).resolve().parents[1]
P = "plugins.pool_filters"
MESSAGE = b"From: a@example.org\r\nSubject: x\r\n\r\nhello\r\n"
SPAM = TESTS / "data" / "spam"


def ctx(uid: str = "1", removed: Path | None = None) -> FilterContext:
    return FilterContext(user="alice", uid=uid, removed_dir=removed)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not reaped yet is a zombie: dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def corpus() -> list[bytes]:
    found = [path.read_bytes() for path in sorted((TESTS / "data" / "attachments").glob("*.eml"))]
    found += [path.read_bytes() for path in sorted((TESTS / "data" / "mail").glob("*.eml"))]
    for label in ("spam", "ham"):
        found += [data for _, data in iter_messages([SPAM / "test" / f"{label}.mbox"])][:15]
    return found


@pytest.fixture(scope="module")
def bayes_db(tmp_path_factory) -> Path:
    bayes = Bayes(tmp_path_factory.mktemp("bayes") / "bayes.sqlite")
    bayes.train([SPAM / "train" / "spam.mbox"], [SPAM / "train" / "ham.mbox"])
    return bayes.path


def test_built_in_filters_give_the_same_result_in_the_pool_as_in_threads(bayes_db, tmp_path):
    tables = [
        {"use": "attachments"},
        {"use": "spam", "database": str(bayes_db), "action": "tag"},
        {"use": "headers", "remove": ["X-Mailer"]},
    ]
    threads = build_pipeline(tables, processes=0)
    pooled = build_pipeline(tables, processes=2)
    assert threads.pool is None
    assert pooled.pool is not None and pooled.parallelism == 2
    messages = corpus()
    assert len(messages) > 30

    async def run_all(pipeline: Pipeline, removed: Path) -> list:
        out = []
        for index, data in enumerate(messages):
            r = await pipeline.run(data, ctx(str(index), removed))
            out.append((r.data, r.action, r.verdicts, r.errors))
        return out

    by_thread = trio.run(run_all, threads, tmp_path / "t")
    by_pool = trio.run(run_all, pooled, tmp_path / "p")
    assert by_pool == by_thread
    assert any(b"X-Spam" in data for data, *_ in by_pool)  # the spam filter did tag something
    assert any(verdicts and "attachments" in v for _, _, verdicts, _ in by_pool for v in verdicts)
    kept = sorted(p.relative_to(tmp_path / "t") for p in (tmp_path / "t").rglob("*") if p.is_file())
    assert kept and kept == sorted(p.relative_to(tmp_path / "p") for p in (tmp_path / "p").rglob("*") if p.is_file())


async def test_only_cpu_bound_filters_leave_the_process():
    p = build_pipeline([{"use": f"{P}:Where"}, {"use": f"{P}:ThreadWhere"}], processes=1)
    result = await p.run(MESSAGE, ctx())
    pids = [v.split()[-1] for v in result.verdicts]
    assert pids[0] != str(os.getpid()) and pids[1] == str(os.getpid())


async def test_zero_processes_keeps_every_filter_in_a_thread():
    p = build_pipeline([{"use": f"{P}:Where"}], processes=0)
    assert p.pool is None
    result = await p.run(MESSAGE, ctx())
    assert result.verdicts == [f"where: pid {os.getpid()}"]


def test_a_filter_built_without_its_table_stays_in_a_thread():
    from pop3proxy.filtering.loader import load_filter

    p = Pipeline([load_filter({"use": f"{P}:Where"})], processes=2)  # no tables: nothing to rebuild from
    assert p.pool is None


@pytest.mark.parametrize("on_error", ["pass", "hold"])
async def test_a_hanging_filter_is_killed_at_its_timeout_and_the_message_goes_on(tmp_path, on_error):
    pidfile = tmp_path / "pid"
    p = build_pipeline(
        [{"use": f"{P}:Hang", "pidfile": str(pidfile), "timeout": 1.0, "on_error": on_error}, {"use": f"{P}:Where"}],
        processes=1,
    )
    start = time.monotonic()
    result = await p.run(MESSAGE, ctx())
    elapsed = time.monotonic() - start
    assert elapsed >= 1.0, elapsed
    assert result.errors == ["hang: timed out after 1 s"]
    assert result.data.endswith(f"{WARNING_HEADER}: filter hang failed: timed out after 1 s\r\n".encode() + MESSAGE)
    assert result.action == ("hold" if on_error == "hold" else "deliver")
    hung = int(pidfile.read_text())
    eventually(lambda: not alive(hung), timeout=5)
    if on_error == "pass":  # the next filter ran, in a new process
        assert result.verdicts and result.verdicts[0].split()[-1] not in ("", str(hung))


async def test_a_pool_process_start_is_not_on_the_filters_time():
    # Building the filter in a new pool process takes longer than its timeout (a loaded machine, a slow
    # import): the call is not timed out for it, the filter runs.
    p = build_pipeline([{"use": f"{P}:SlowStart", "seconds": 1.5, "timeout": 1.0}], processes=1)
    result = await p.run(MESSAGE, ctx())
    assert result.errors == [] and result.verdicts[0].startswith("slowstart: started ")


@pytest.mark.parametrize("how, code", [("exit", 7), ("segv", -11)])
async def test_a_crashing_pool_process_costs_no_message(how, code):
    p = build_pipeline([{"use": f"{P}:Crash", "how": how}, {"use": f"{P}:Where"}], processes=1)
    for uid in ("1", "2"):
        result = await p.run(MESSAGE, ctx(uid))
        assert result.errors == [f"crash: its pool process died (exit code {code})"]
        assert result.data.endswith(MESSAGE) and b"filter crash failed" in result.data
        assert result.action == "deliver"
        assert result.verdicts and result.verdicts[0].startswith("where: pid ")  # a new process took over


async def test_a_crash_with_on_error_hold_holds_the_message():
    p = build_pipeline([{"use": f"{P}:Crash", "on_error": "hold"}], processes=1)
    result = await p.run(MESSAGE, ctx())
    assert result.action == "hold" and result.data.endswith(MESSAGE)


@pytest.mark.parametrize(
    "use, error",
    [
        ("Raising", "ValueError: cannot parse this"),
        ("Exiting", "SystemExit: 3"),
        ("Unpicklable", "returned function, not a FilterOutcome"),
    ],
)
async def test_a_failing_pooled_filter_is_reported_as_in_a_thread(use, error):
    p = build_pipeline([{"use": f"{P}:{use}"}, {"use": f"{P}:Where"}], processes=1)
    result = await p.run(MESSAGE, ctx())
    name = use.lower()
    assert result.errors == [f"{name}: {error}"]
    assert result.data.endswith(MESSAGE) and result.action == "deliver"
    assert len(result.verdicts) == 1  # the next filter still ran


@pytest.mark.parametrize("processes", [1, 2])
def test_concurrent_calls_never_exceed_the_process_limit(tmp_path, processes):
    record = tmp_path / "calls"
    p = build_pipeline([{"use": f"{P}:Where", "seconds": 0.3, "record": str(record)}], processes=processes,
                       concurrency=8)
    assert p.parallelism == 8

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for uid in range(3 * processes + 1):
                nursery.start_soon(p.run, MESSAGE, ctx(str(uid)))
        running, idle = p.pool.statistics()
        assert running == 0 and idle <= processes

    trio.run(main)
    calls = [line.split() for line in record.read_text().splitlines()]
    assert len(calls) == 3 * processes + 1
    assert len({pid for pid, _, _ in calls}) == processes  # the limit, reached and not passed
    events = sorted([(float(s), 1) for _, s, _ in calls] + [(float(e), -1) for _, _, e in calls])
    overlap = peak = 0
    for _, step in events:
        overlap += step
        peak = max(peak, overlap)
    assert peak == processes


def test_pool_processes_exit_when_idle_and_when_the_run_ends(tmp_path):
    p = build_pipeline([{"use": f"{P}:Where"}], processes=1)
    p.pool.idle_timeout = 0.5

    async def once() -> int:
        return int((await p.run(MESSAGE, ctx())).verdicts[0].split()[-1])

    async def idle() -> None:
        pid = await once()
        await eventually_async(lambda: not alive(pid), timeout=10)
        assert pid != await once()  # a new one on demand

    trio.run(idle)
    p.pool.idle_timeout = 600
    pid = trio.run(once)
    eventually(lambda: not alive(pid), timeout=10)  # gone with the run that used it, not after 600 s


async def test_the_command_line_runner_works_with_the_pool():
    p = build_pipeline([{"use": f"{P}:Where"}], processes=1)
    result = await trio.to_thread.run_sync(p.run_sync, MESSAGE, ctx())
    assert result.verdicts[0] != f"where: pid {os.getpid()}"


def test_the_processes_setting(monkeypatch, tmp_path):
    assert Settings().sync.filter_processes == 0  # threads: faster where no core is idle
    assert resolve_processes("auto") == len(os.sched_getaffinity(0))
    assert resolve_processes(0) == 0 and resolve_processes(3) == 3
    for bad in (-1, "many"):
        with pytest.raises(ValueError):
            resolve_processes(bad)
    monkeypatch.setenv("POP3PROXY_SYNC__FILTER_PROCESSES", "3")
    assert Settings().sync.filter_processes == 3
    from pop3proxy.config import load_settings

    for bad in ("-1", "many"):
        monkeypatch.setenv("POP3PROXY_SYNC__FILTER_PROCESSES", bad)
        with pytest.raises(ConfigError, match="filter_processes"):
            load_settings(None)
