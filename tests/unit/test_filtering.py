"""The filter pipeline: loading plugins, failure policies, worker threads.

Byte-exact header editing and the ``headers`` filter are tested in test_headers_filter.py, the
``pop3proxy filter`` command and the plugin guide's example in test_filter_command.py.
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from pathlib import Path

import pytest
import trio
from helpers.common import write_config
from helpers.filtering import CTX, LUNCH, MIXED, NEWSLETTER, P, dkim_verifies, pipeline, run_cli
from helpers.filtering import _reset_plugins  # noqa: F401  (fixtures)
from plugins import pipeline_filters
from plugins.example_filter import SubjectWatch

from pop3proxy.filtering import loader as filtering_loader
from pop3proxy.filtering.api import (
    WARNING_HEADER,
    FilterConfigError,
    FilterContext,
    FilterResult,
)
from pop3proxy.filtering.headers import split_header
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filtering.pipeline import Pipeline, build_pipeline
from pop3proxy.filters.headers import HeadersFilter


def test_the_dkim_samples_verify_and_the_verifier_notices_tampering():
    for path in (NEWSLETTER, MIXED):
        data = path.read_bytes()
        assert dkim_verifies(data), path.name
        assert not dkim_verifies(data.replace(b"alice@example.com\r\nSubject", b"alice@example.org\r\nSubject", 1)
                                 if path == NEWSLETTER else data.replace(b"To: bob@", b"To: rob@"))
        assert not dkim_verifies(data.replace(b"Kuchen am Freitag", b"Kuchen am Samstag")
                                 if path == MIXED else data.replace(b"Liebe Alice", b"Liebe Alma"))


# -- loading --------------------------------------------------------------------------------------


def test_builtin_filter_by_name():
    flt, options = load_filter({"use": "headers", "remove": ["X-A"], "timeout": 5})
    assert isinstance(flt, HeadersFilter)
    assert flt.remove == ["X-A"]
    assert (options.use, options.on_error, options.timeout) == ("headers", "pass", 5)


def test_module_class_filter():
    flt, options = load_filter({"use": "plugins.example_filter:SubjectWatch", "words": ["x"], "on_error": "hold"})
    assert isinstance(flt, SubjectWatch)
    assert options.on_error == "hold"


def _entry_points(*eps: importlib.metadata.EntryPoint):
    def fake(group: str):
        assert group == "pop3proxy.filters"
        return list(eps)

    return fake


def test_entry_point_filter(monkeypatch):
    ep = importlib.metadata.EntryPoint(
        name="subject-watch", value="plugins.example_filter:SubjectWatch", group="pop3proxy.filters"
    )
    monkeypatch.setattr(filtering_loader, "entry_points", _entry_points(ep))
    flt, _ = load_filter({"use": "subject-watch", "words": ["lunch"]})
    assert isinstance(flt, SubjectWatch)
    assert flt.words == ["lunch"]


def test_entry_point_that_fails_to_load(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="broken", value="plugins.broken_import:Broken", group="pop3proxy.filters")
    monkeypatch.setattr(filtering_loader, "entry_points", _entry_points(ep))
    with pytest.raises(FilterConfigError) as info:
        load_filter({"use": "broken"})
    assert "'broken'" in str(info.value)
    assert "plugins.broken_import:Broken" in str(info.value)
    assert "pop3proxy_no_such_dependency" in str(info.value)


def test_builtin_wins_over_an_entry_point_of_the_same_name(monkeypatch):
    ep = importlib.metadata.EntryPoint(
        name="headers", value="plugins.example_filter:SubjectWatch", group="pop3proxy.filters"
    )
    monkeypatch.setattr(filtering_loader, "entry_points", _entry_points(ep))
    flt, _ = load_filter({"use": "headers"})
    assert isinstance(flt, HeadersFilter)


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"use": "nosuchfilter"}, "unknown filter 'nosuchfilter'"),
        ({"use": "No Such Filter"}, "unknown filter 'No Such Filter'"),
        ({"use": "plugins.no_such_module:X"}, "cannot import plugins.no_such_module"),
        ({"use": f"{P}:Missing"}, f"{P} has no Missing"),
        ({"use": "plugins.broken_import:Broken"}, "No module named 'pop3proxy_no_such_dependency'"),
        ({"use": f"{P}:BadInit"}, "cannot start: RuntimeError: no spamd at 127.0.0.1:9"),
        ({"use": f"{P}:BadInit", "address": "192.0.2.1:783"}, "no spamd at 192.0.2.1:783"),
        ({"use": f"{P}:Tag", "lable": "x"}, "unknown option(s) lable"),
        ({"use": f"{P}:Failing", "level": 3}, "unknown option(s) level"),
        ({"use": "headers", "remvoe": ["X-A"]}, "remvoe"),
        ({"use": "headers", "remove": "X-A"}, "remove: Input should be a valid list"),
        ({"use": "headers", "add": {"Bad Name": "x"}}, "invalid header name 'Bad Name'"),
        ({"use": "headers", "remove": ["X-A: b"]}, "is not a header name pattern"),
        ({"use": f"{P}:Tag", "on_error": "retry"}, "on_error"),
        ({"use": f"{P}:Tag", "timeout": -1}, "timeout"),
        ({"use": f"{P}:NoName"}, "not a filter class"),
        ({"use": f"{P}:not_a_class"}, "not a filter class"),
        ({"use": f"{P}:WrongCall"}, "its call must take (message, context)"),
        ({"use": "plugins.example_filter:SubjectWatch", "words": []}, "words"),
        ({"use": "plugins.example_filter:SubjectWatch", "words": [" "]}, "words must not be blank"),
    ],
)
def test_a_filter_that_cannot_be_loaded_is_named(table, expected):
    tables = [{"use": "headers"}, table]
    with pytest.raises(FilterConfigError) as info:
        build_pipeline(tables)
    message = str(info.value)
    assert message.startswith("filters[1]"), message
    assert expected in message, message
    assert "\n" not in message


def _proxy_config(tmp_path: Path, filters: list[dict]) -> Path:
    return write_config(
        tmp_path / "c.toml",
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "upstream": {"host": "127.0.0.1", "port": 9, "tls": "none"},
            "cache": {"root": str(tmp_path / "cache")},
            "filters": filters,
        },
    )


@pytest.mark.parametrize(
    "filters, expected",
    [
        ([{"use": "nosuchfilter"}], "unknown filter 'nosuchfilter'"),
        ([{"use": "headers"}, {"use": f"{P}:BadInit"}], "filters[1] (plugins.pipeline_filters:BadInit): cannot start"),
    ],
)
def test_serve_with_a_bad_filter_says_so_in_one_line(tmp_path, filters, expected):
    result = run_cli("serve", "--config", str(_proxy_config(tmp_path, filters)))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lines[0].startswith("pop3proxy: ")


# -- the pipeline -----------------------------------------------------------------------------------


async def test_no_filters_is_the_identity():
    data = NEWSLETTER.read_bytes()
    result = await Pipeline().run(data, CTX)
    assert result == FilterResult(data)
    assert not Pipeline()


async def test_filters_run_in_order_and_their_verdicts_are_kept():
    p = pipeline(
        {"use": f"{P}:Tag", "label": "first", "verdict": "one"},
        {"use": f"{P}:Tag", "label": "second"},
        {"use": f"{P}:Tag", "label": "third", "verdict": "three"},
    )
    data = LUNCH.read_bytes()
    result = await p.run(data, CTX)
    assert result.data == b"X-Tag: third\r\nX-Tag: second\r\nX-Tag: first\r\n" + data
    assert result.verdicts == ["tag: one", "tag: three"]
    assert (result.action, result.errors) == ("deliver", [])
    assert [label for label, _ in pipeline_filters.Tag.calls] == ["first", "second", "third"]


async def test_on_error_pass_marks_the_message_and_keeps_every_other_byte():
    p = pipeline({"use": f"{P}:Failing"}, {"use": f"{P}:Tag", "label": "after"})
    data = NEWSLETTER.read_bytes()
    result = await p.run(data, CTX)
    assert result.action == "deliver"
    assert result.errors == ["failing: ConnectionRefusedError: backend at 127.0.0.1:9 refused the connection"]
    warning = (
        b"X-POP3Proxy-Warning: filter failing failed: ConnectionRefusedError: backend at\r\n"
        b" 127.0.0.1:9 refused the connection\r\n"
    )
    assert result.data == b"X-Tag: after\r\n" + warning + data
    assert dkim_verifies(result.data)
    fields, _ = split_header(result.data)
    assert fields[1].name == WARNING_HEADER


async def test_on_error_hold_holds_the_message_and_stops_the_pipeline():
    p = pipeline({"use": f"{P}:Tag", "label": "before"}, {"use": f"{P}:Failing", "on_error": "hold"},
                 {"use": f"{P}:Tag", "label": "never"})
    data = LUNCH.read_bytes()
    result = await p.run(data, CTX)
    assert result.action == "hold" and result.hold
    assert result.errors == ["failing: ConnectionRefusedError: backend at 127.0.0.1:9 refused the connection"]
    assert [label for label, _ in pipeline_filters.Tag.calls] == ["before"]
    assert result.data.endswith(b"X-Tag: before\r\n" + data)
    assert result.data.startswith(b"X-POP3Proxy-Warning: filter failing failed:")


async def test_a_filter_calling_sys_exit_is_a_failure_not_an_exit():
    result = await pipeline({"use": f"{P}:Exiting"}).run(b"Subject: x\r\n\r\nbody\r\n", CTX)
    assert result.errors == ["exiting: SystemExit: 3"]
    assert result.action == "deliver"


async def test_a_filter_that_overruns_its_timeout_is_a_failure_within_the_timeout():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 30, "timeout": 0.3}, {"use": f"{P}:Tag"})
    data = LUNCH.read_bytes()
    start = time.monotonic()
    result = await p.run(data, CTX)
    elapsed = time.monotonic() - start
    assert 0.25 < elapsed < 3
    assert result.errors == ["sleepy: timed out after 0.3 s"]
    assert result.data == b"X-Tag: tagged\r\nX-POP3Proxy-Warning: filter sleepy failed: timed out after 0.3 s\r\n" + data


async def test_an_abandoned_filter_thread_does_not_block_the_next_message():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 30, "timeout": 0.2}, concurrency=1)
    start = time.monotonic()
    for uid in ("1", "2", "3"):
        result = await p.run(b"Subject: x\r\n\r\n", FilterContext("alice", uid))
        assert result.errors == ["sleepy: timed out after 0.2 s"]
    assert time.monotonic() - start < 3


async def test_a_hold_on_timeout():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 30, "timeout": 0.2, "on_error": "hold"})
    result = await p.run(b"Subject: x\r\n\r\n", CTX)
    assert result.action == "hold"


@pytest.mark.parametrize(
    "kind, error",
    [
        ("string", "returned str, not a FilterOutcome"),
        ("none", "returned NoneType, not a FilterOutcome"),
        ("text-data", "returned data of type str, not bytes"),
        ("empty", "returned an empty message"),
        ("action", "returned the unknown action 'discard'"),
    ],
)
async def test_a_filter_returning_garbage_is_a_failure(kind, error):
    data = LUNCH.read_bytes()
    result = await pipeline({"use": f"{P}:Garbage", "kind": kind}).run(data, CTX)
    assert result.errors == [f"garbage: {error}"]
    assert result.action == "deliver"
    assert result.data.endswith(data)
    assert result.data.startswith(b"X-POP3Proxy-Warning: filter garbage failed: ")


async def test_quarantine_stops_the_pipeline():
    p = pipeline({"use": f"{P}:Quarantine"}, {"use": f"{P}:Tag"})
    data = LUNCH.read_bytes()
    result = await p.run(data, CTX)
    assert (result.action, result.verdicts, result.data) == ("quarantine", ["quarantine: spam (score 12.5)"], data)
    assert pipeline_filters.Tag.calls == []


async def test_filters_run_in_worker_threads_in_parallel():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 0.5}, concurrency=2)
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for uid in ("1", "2"):
            nursery.start_soon(p.run, b"Subject: x\r\n\r\n", FilterContext("alice", uid))
    elapsed = time.monotonic() - start
    assert elapsed < 0.9, f"two 0.5 s filters took {elapsed:.2f} s: not in parallel"
    threads = pipeline_filters.Sleepy.threads
    assert len(threads) == 2 and len(set(threads)) == 2
    assert threading.get_ident() not in threads


async def test_concurrency_is_bounded():
    p = pipeline({"use": f"{P}:Sleepy", "seconds": 0.3}, concurrency=1)
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for uid in ("1", "2"):
            nursery.start_soon(p.run, b"Subject: x\r\n\r\n", FilterContext("alice", uid))
    assert time.monotonic() - start >= 0.55
