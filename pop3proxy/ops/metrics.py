"""Prometheus counters and the functions that bump them. A leaf: imports nothing of ours,
so any layer may count without creating a cycle.
"""

from __future__ import annotations

import logging
import re

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

log = logging.getLogger("pop3proxy.metrics")

try:  # the *_created series add nothing here
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # older prometheus_client
    pass

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

SESSIONS = Counter("pop3proxy_sessions", "POP3 client connections accepted.", registry=REGISTRY)
# multiprocess_mode: how the values of several worker processes add up (`listen.workers`)
SESSIONS_ACTIVE = Gauge("pop3proxy_sessions_active", "POP3 sessions open right now.", registry=REGISTRY,
                        multiprocess_mode="livesum")
LOGINS = Counter("pop3proxy_logins", "POP3 logins by result (ok, failed).", ["result"], registry=REGISTRY)
UPSTREAM_LATENCY = Histogram(
    "pop3proxy_upstream_latency_seconds",
    "Time to connect to the provider and log in.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
SYNC_MESSAGES = Counter("pop3proxy_sync_messages", "Messages fetched from providers into the cache.", registry=REGISTRY)
SYNC_BYTES = Counter("pop3proxy_sync_bytes", "Octets fetched from providers into the cache.", registry=REGISTRY)
FILTER_VERDICTS = Counter(
    "pop3proxy_filter_verdicts", "Filter outcomes by filter and verdict.", ["filter", "verdict"], registry=REGISTRY
)
BACKGROUND_ERRORS = Counter(
    "pop3proxy_background_errors",
    "Unexpected errors caught in background work (sync, prefetch, login), by task; the service goes on.",
    ["task"],
    registry=REGISTRY,
)
FILTER_ERRORS = Counter("pop3proxy_filter_errors", "Filter failures by filter.", ["filter"], registry=REGISTRY)
SMTP_LOGINS = Counter(
    "pop3proxy_smtp_logins", "SMTP AUTH attempts by result (ok, offline, failed, unavailable).", ["result"],
    registry=REGISTRY,
)
SMTP_MESSAGES = Counter(
    "pop3proxy_smtp_messages",
    "Submitted messages by outcome (relayed, queued, rejected, unavailable, error, delivered_from_queue, bounced).",
    ["result"],
    registry=REGISTRY,
)

OAUTH2_NEEDS_AUTHORISATION = Gauge(
    "pop3proxy_oauth2_needs_authorisation",
    "1 for an OAuth2 account whose grant the authorization server refused (run `pop3proxy oauth login`).",
    ["account"], registry=REGISTRY, multiprocess_mode="mostrecent",
)
OAUTH2_REFRESHES = Counter(
    "pop3proxy_oauth2_refreshes", "OAuth2 token refreshes by result (ok, transient, invalid_grant).",
    ["result"], registry=REGISTRY,
)

_LOGIN_RESULTS = frozenset({"ok", "failed", "offline", "unavailable", "error"})
_TOKEN = re.compile(r"[a-z0-9_.-]+")


def _token(text: str, default: str = "other", limit: int = 32) -> str:
    """A bounded label value: the first word of ``text``, lower case, safe characters only."""
    word = (text or "").strip().split(None, 1)[0].lower() if (text or "").strip() else ""
    word = word.rstrip(":,;")
    return word[:limit] if _TOKEN.fullmatch(word or "-") and word else default


def session_started() -> None:
    SESSIONS.inc()
    SESSIONS_ACTIVE.inc()


def session_ended() -> None:
    SESSIONS_ACTIVE.dec()


def login(result: str) -> None:
    """A POP3 login: ``ok`` or ``failed`` (other words are counted as ``error``)."""
    LOGINS.labels(result=result if result in _LOGIN_RESULTS else "error").inc()


def smtp_login(result: str) -> None:
    SMTP_LOGINS.labels(result=result if result in _LOGIN_RESULTS else "error").inc()


def smtp_message(result: str) -> None:
    SMTP_MESSAGES.labels(result=_token(result)).inc()


def upstream_latency(seconds: float) -> None:
    UPSTREAM_LATENCY.observe(max(0.0, seconds))



def synced(messages: int, octets: int) -> None:
    SYNC_MESSAGES.inc(max(0, messages))
    SYNC_BYTES.inc(max(0, octets))


def filter_verdict(filter_name: str, verdict: str) -> None:
    """One filter outcome. Pass a short word (the action: deliver, hold, quarantine, or a tag such as
    spam/ham); anything longer is cut to its first word so labels stay few."""
    FILTER_VERDICTS.labels(filter=_token(filter_name, "unnamed", 64), verdict=_token(verdict, "none")).inc()


def filter_error(filter_name: str) -> None:
    FILTER_ERRORS.labels(filter=_token(filter_name, "unnamed", 64)).inc()


def oauth2_state(account: str, needs_authorisation: bool) -> None:
    """The account names come from the configuration only, so this label stays bounded."""
    OAUTH2_NEEDS_AUTHORISATION.labels(account=account[:128]).set(1 if needs_authorisation else 0)


def oauth2_refresh(result: str) -> None:
    OAUTH2_REFRESHES.labels(result=result if result in ("ok", "transient", "invalid_grant") else "other").inc()


def background_error(task: str) -> None:
    BACKGROUND_ERRORS.labels(_token(task)).inc()
