"""The Prometheus endpoint: scraped over HTTP with urllib, in-process and from a real serve process."""

from __future__ import annotations

import poplib
import re
import urllib.error
import urllib.request

import pytest
import trio
from helpers.common import HOST, write_config
from helpers.waiting import eventually, wait_for

from pop3proxy.admin import metrics_http
from pop3proxy.config import load_settings, queue_dir
from pop3proxy.ops import metrics
from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store
from pop3proxy.submission.queue import OutQueue

_METRICS_READY = re.compile(r"listening for metrics on \S+ port (\d+)")


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in the Prometheus text format, or None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = ",".join(sorted(part for part in re.findall(r'[a-zA-Z_]+="[^"]*"', match.group(2) or "")))
        if found == want:
            return float(match.group(3))
    return None


def config(tmp_path, **sections):
    base = {
        "listen": {"host": HOST, "port": 0},
        "cache": {"root": str(tmp_path / "cache")},
        "metrics": {"host": HOST, "port": 0},
    }
    base.update(sections)
    return write_config(tmp_path / "pop3proxy.toml", base)


async def test_endpoint_serves_every_metric_with_labels(tmp_path):
    settings = load_settings(config(tmp_path))
    root = settings.cache.root
    with open_store(root, "alice") as mailbox:
        mailbox.add(b"Subject: a\r\n\r\nfirst\r\n")
        mailbox.add(b"Subject: b\r\n\r\nsecond message\r\n")
    with open_store(root, "bob@example.org", "mbox") as mailbox:
        mailbox.add(b"Subject: c\r\n\r\nFrom here on\r\n")
    OutQueue(queue_dir(settings)).add(login="alice", cache_id="alice", sender="alice@example.com",
                                      recipients=["x@example.net"], data=b"Subject: q\r\n\r\nq\r\n")

    metrics.session_started()
    metrics.login("ok")
    metrics.login("failed")
    metrics.login("something else")
    metrics.upstream_latency(0.3)
    metrics.synced(2, 1500)
    metrics.filter_verdict("spam", "quarantine")
    metrics.filter_verdict("spam", "Spam score 7.5 of 5.0, tagged")  # free text never becomes a label
    metrics.filter_error("clamav")
    metrics.smtp_message("queued")

    async with trio.open_nursery() as nursery:
        port = await nursery.start(metrics_http.serve_metrics, settings)
        status, content_type, text = await trio.to_thread.run_sync(scrape, port)
        missing = await trio.to_thread.run_sync(scrape, port, "/other")
        nursery.cancel_scope.cancel()

    assert status == 200 and content_type.startswith("text/plain")
    for name in (
        "pop3proxy_sessions_total", "pop3proxy_sessions_active", "pop3proxy_logins_total",
        "pop3proxy_upstream_latency_seconds", "pop3proxy_sync_messages_total", "pop3proxy_sync_bytes_total",
        "pop3proxy_filter_verdicts_total", "pop3proxy_filter_errors_total", "pop3proxy_queue_size",
        "pop3proxy_cache_messages", "pop3proxy_cache_bytes", "pop3proxy_smtp_messages_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert sample(text, "pop3proxy_sessions_total") >= 1
    assert sample(text, "pop3proxy_logins_total", result="ok") >= 1
    assert sample(text, "pop3proxy_logins_total", result="failed") >= 1
    assert sample(text, "pop3proxy_logins_total", result="error") >= 1
    assert sample(text, "pop3proxy_upstream_latency_seconds_count") >= 1
    assert sample(text, "pop3proxy_upstream_latency_seconds_bucket", le="0.5") >= 1
    assert sample(text, "pop3proxy_sync_bytes_total") >= 1500
    assert sample(text, "pop3proxy_filter_verdicts_total", filter="spam", verdict="quarantine") >= 1
    assert sample(text, "pop3proxy_filter_verdicts_total", filter="spam", verdict="spam") >= 1
    assert "7.5" not in "".join(line for line in text.splitlines() if line.startswith("pop3proxy_filter"))
    assert sample(text, "pop3proxy_filter_errors_total", filter="clamav") >= 1
    assert sample(text, "pop3proxy_smtp_messages_total", result="queued") >= 1
    # computed from disk at scrape time
    assert sample(text, "pop3proxy_queue_size") == 1
    assert sample(text, "pop3proxy_cache_messages", user="alice") == 2
    assert sample(text, "pop3proxy_cache_bytes", user="alice") == len(b"Subject: a\r\n\r\nfirst\r\n") + len(
        b"Subject: b\r\n\r\nsecond message\r\n"
    )
    assert sample(text, "pop3proxy_cache_messages", user="bob@example.org") == 1
    assert sample(text, "pop3proxy_cache_bytes", user="bob@example.org") > 0
    assert missing[0] == 404


async def test_port_in_use_is_a_clear_startup_error(tmp_path):
    from pop3proxy.errors import StartupError

    settings = load_settings(config(tmp_path))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(metrics_http.serve_metrics, settings)
        settings.metrics.port = port
        with pytest.raises(StartupError, match=f"cannot listen for metrics on {HOST}:{port}: address already in use"):
            await metrics_http.serve_metrics(settings)
        nursery.cancel_scope.cancel()


def test_serve_process_counts_sessions_and_logins(tmp_path, server_process):
    users = tmp_path / "users"
    set_password(users, "alice", "pw-for-metrics")
    path = config(tmp_path, local={"users_file": str(users)})
    server = server_process(path).start()
    port = int(wait_for(server, _METRICS_READY, timeout=15).group(1))
    client = poplib.POP3(HOST, server.port, timeout=30)
    client.user("alice")
    client.pass_("pw-for-metrics")
    client.quit()
    bad = poplib.POP3(HOST, server.port, timeout=30)
    bad.user("alice")
    with pytest.raises(poplib.error_proto):
        bad.pass_("nope")
    bad.quit()

    def settled():
        text = scrape(port)[2]
        return text if sample(text, "pop3proxy_sessions_active") == 0 else None

    text = eventually(settled, timeout=10)
    assert sample(text, "pop3proxy_sessions_total") == 2
    assert sample(text, "pop3proxy_logins_total", result="ok") == 1
    assert sample(text, "pop3proxy_logins_total", result="failed") == 1
    assert sample(text, "pop3proxy_cache_messages", user="alice") == 0
    assert sample(text, "process_resident_memory_bytes") > 0
