"""Which provider a login goes to: the default upstream, `[accounts]`, `user@domain` routes and
`user#host[:port]`, checked against the allow-list.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.net.endpoint import (
    Endpoint,
)

log = logging.getLogger("pop3proxy.proxy")


# ASCII digits only: str.isdigit() and int() also take '²', fullwidth and other scripts' digits.
_PORT = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class Route:
    endpoint: Endpoint
    remote_user: str
    cache_id: str  # the local cache (and lock, and state) of this provider account: see `cache_id`


def _endpoint(settings: Settings, host: str, port: int | None, tls: Literal["implicit", "starttls", "none"],
              ca_file: str | None = None) -> Endpoint:
    up = settings.upstream
    if port is None:
        port = 995 if tls == "implicit" else 110
    return Endpoint(
        host=host,
        port=port,
        tls=tls,
        ca_file=ca_file if ca_file else up.ca_file,
        tls_min_version=up.tls_min_version,
        timeout=up.timeout,
        auth=tuple(up.auth),
        max_message_size=up.max_message_size,
        max_listing=up.max_listing,
    )


def default_endpoint(settings: Settings) -> Endpoint | None:
    """The ``[upstream]`` provider, None in standalone mode."""
    up = settings.upstream
    return _endpoint(settings, up.host, up.effective_port(), up.tls) if up.host else None


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


def _same(a: Endpoint, b: Endpoint) -> bool:
    return a.host.lower() == b.host.lower() and a.port == b.port


def cache_id(settings: Settings, endpoint: Endpoint, remote_user: str) -> str:
    """The canonical name of a provider account, which names its cache, its lock and its state: every
    login name that reaches the same account (``USER`` in another case, ``user#host:port`` spelling out
    the default provider) gets the same one. User names are case-folded unless
    ``upstream.case_sensitive_users`` says the providers tell ``Bob`` from ``bob``."""
    user = remote_user if settings.upstream.case_sensitive_users else remote_user.lower()
    default = default_endpoint(settings)
    if default is not None and _same(endpoint, default):
        return user
    domain = user.rpartition("@")[2] if "@" in user else None
    routes = {name.lower(): route for name, route in settings.routes.items()}
    if domain is not None and domain.lower() in routes:
        route = routes[domain.lower()]
        if _same(endpoint, _endpoint(settings, route.host, route.port, route.tls)):
            return user
    return f"{user}#{endpoint.host.lower()}:{endpoint.port}"


def resolve(login: str, settings: Settings) -> Route:
    """Which provider and remote user a login name means. Raises LoginError for unknown providers."""
    up = settings.upstream
    account = settings.accounts.get(login)
    if account is None and not up.case_sensitive_users:  # USER in another case is the same account
        folded = {name.lower(): name for name in settings.accounts}
        if login.lower() in folded:
            login = folded[login.lower()]
            account = settings.accounts[login]
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
        if not user or not host or (port_text and not _PORT.fullmatch(port_text)):
            raise LoginError("login names look like user, user@domain or user#host[:port]", "AUTH")
        port = int(port_text) if port_text else None
        for endpoint in allowed_endpoints(settings):
            if endpoint.host.lower() == host.lower() and (port is None or endpoint.port == port):
                return Route(endpoint, user, cache_id(settings, endpoint, user))
        raise LoginError(f"provider {target[:100]} is not configured here", "AUTH")
    if "@" in login:
        domain = login.rpartition("@")[2].lower()
        routes = {name.lower(): route for name, route in settings.routes.items()}
        if domain in routes:
            route = routes[domain]
            endpoint = _endpoint(settings, route.host, route.port, route.tls, route.ca_file)
            return Route(endpoint, login, cache_id(settings, endpoint, login))
    if not up.host:
        raise LoginError("no provider configured", "SYS/PERM")
    endpoint = _endpoint(settings, up.host, up.effective_port(), up.tls)
    return Route(endpoint, login, cache_id(settings, endpoint, login))
