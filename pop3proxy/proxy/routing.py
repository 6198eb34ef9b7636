"""Which provider a login goes to: the default upstream, `[accounts]`, `user@domain` routes and
`user#host[:port]`, checked against the allow-list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.net.endpoint import (
    Endpoint,
)

log = logging.getLogger("pop3proxy.proxy")


@dataclass(frozen=True)
class Route:
    endpoint: Endpoint
    remote_user: str
    cache_id: str  # the name of the local cache (and lock, and state) for this login


def _endpoint(settings: Settings, host: str, port: int | None, tls: str, ca_file: str | None = None) -> Endpoint:
    up = settings.upstream
    if port is None:
        port = 995 if tls == "implicit" else 110
    return Endpoint(
        host=host,
        port=port,
        tls=tls,  # type: ignore[arg-type]
        ca_file=ca_file if ca_file else up.ca_file,
        tls_min_version=up.tls_min_version,
        timeout=up.timeout,
        auth=tuple(up.auth),
        max_message_size=up.max_message_size,
        max_listing=up.max_listing,
    )


def allowed_endpoints(settings: Settings) -> list[Endpoint]:
    """Every provider the configuration names: the only hosts the proxy ever connects to."""
    up = settings.upstream
    found: list[Endpoint] = []
    if up.host:
        found.append(_endpoint(settings, up.host, up.effective_port(), up.tls))
    for route in settings.routes.values():
        found.append(_endpoint(settings, route.host, route.port, route.tls, route.ca_file))
    for account in settings.accounts.values():
        if account.host:
            tls = account.tls or up.tls
            found.append(_endpoint(settings, account.host, account.port, tls))
    return found


def resolve(login: str, settings: Settings) -> Route:
    """Which provider and remote user a login name means. Raises LoginError for unknown providers."""
    up = settings.upstream
    account = settings.accounts.get(login)
    if account is not None:
        host = account.host or up.host
        if not host:
            raise LoginError("no provider configured for this account", "SYS/PERM")
        tls = account.tls or (up.tls if not account.host else "implicit")
        port = account.port if account.port is not None else (up.effective_port() if not account.host else None)
        endpoint = _endpoint(settings, host, port, tls)
        return Route(endpoint, account.remote_user or login, login)
    if "#" in login:
        user, _, target = login.rpartition("#")
        host, _, port_text = target.partition(":")
        if not user or not host or (port_text and not port_text.isdigit()):
            raise LoginError("login names look like user, user@domain or user#host[:port]", "AUTH")
        port = int(port_text) if port_text else None
        for endpoint in allowed_endpoints(settings):
            if endpoint.host.lower() == host.lower() and (port is None or endpoint.port == port):
                return Route(endpoint, user, f"{user}#{endpoint.host.lower()}:{endpoint.port}")
        raise LoginError(f"provider {target[:100]} is not configured here", "AUTH")
    if "@" in login:
        domain = login.rpartition("@")[2].lower()
        routes = {name.lower(): route for name, route in settings.routes.items()}
        if domain in routes:
            route = routes[domain]
            return Route(_endpoint(settings, route.host, route.port, route.tls, route.ca_file), login, login)
    if not up.host:
        raise LoginError("no provider configured", "SYS/PERM")
    return Route(_endpoint(settings, up.host, up.effective_port(), up.tls), login, login)
