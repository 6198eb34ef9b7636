"""The one rule for a provider that cannot be trusted: its failure is never a reason for offline mode."""

from __future__ import annotations

import logging

from pop3proxy.errors import LoginError
from pop3proxy.net.endpoint import UpstreamError, may_go_offline
from pop3proxy.proxy.routing import Route

log = logging.getLogger("pop3proxy.proxy")


def refuse_untrusted(route: Route, reason: BaseException) -> None:
    """Raise `LoginError` [SYS/TEMP] (and log an ERROR) when ``reason`` is a failure towards the provider
    that must not lead to offline mode (`net.endpoint.may_go_offline`): a forged certificate, a broken
    handshake, a stripped or tampered STLS is what someone in the middle can cause at will."""
    if not isinstance(reason, UpstreamError) or may_go_offline(reason):
        return
    verify_failed = getattr(reason, "tls_verify_failed", False)
    log.error("provider %s:%d for %r cannot be trusted, login refused%s: %s",
              route.endpoint.host, route.endpoint.port, route.cache_id,
              " (possible interception)" if verify_failed else "", reason)
    raise LoginError("the mail provider's TLS cannot be trusted, try again later", "SYS/TEMP")
