"""The console's routes: pages (Jinja2, autoescaped) and the same data as JSON under /api/.

Every route but the sign-in page needs a session; an account in a URL must be the signed-in user's
own (or the user is in ``web.admins``), else 403. Every POST carries the session's CSRF token. The
handlers (`routes_signin`, `routes_pages`, `routes_api`) find what they need in ``app.state.console``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route

from pop3proxy.admin.cluster_view import ClusterWatch
from pop3proxy.config import Settings
from pop3proxy.net.backend_api import Backend
from pop3proxy.store.api import Counters
from pop3proxy.web import routes_api as api
from pop3proxy.web import routes_pages as pages
from pop3proxy.web import routes_signin as signin
from pop3proxy.web.console import COOKIE, MAX_FORM, Console, templates
from pop3proxy.web.sessions import Sessions

__all__ = ["COOKIE", "MAX_FORM", "ROUTES", "build_app"]

GET, POST = ["GET"], ["POST"]

ROUTES = [
    Route("/login", signin.login_get, methods=GET),
    Route("/login", signin.login_post, methods=POST),
    Route("/style.css", signin.style, methods=GET),
    Route("/logout", signin.logout, methods=POST),
    Route("/", pages.overview, methods=GET),
    Route("/held", pages.held, methods=GET),
    Route("/held/{account}/{key}", pages.held_detail, methods=GET),
    Route("/held/{account}/{key}/raw", pages.held_raw, methods=GET),
    Route("/held/{account}/{key}/{action:str}", pages.held_act, methods=POST),
    Route("/mail/{account}", pages.mail, methods=GET),
    Route("/plot/{account}/{kind}.svg", pages.plot, methods=GET),
    Route("/train/{account}/{where}/{key}", pages.train, methods=POST),
    Route("/config", pages.config, methods=GET),
    Route("/api/status", api.api_status, methods=GET),
    Route("/api/held", api.api_held, methods=GET),
    Route("/api/plots/{account}", api.api_plots, methods=GET),
    Route("/api/mail/{account}", api.api_mail, methods=GET),
    Route("/api/config", api.api_config, methods=GET),
    Route("/api/cluster", api.api_cluster, methods=GET),
]


def build_app(settings: Settings, backend: Backend, gate: Counters, *, secure: bool,
              sessions: Sessions | None = None, cluster: ClusterWatch | None = None) -> Starlette:
    web = settings.web
    app = Starlette(routes=ROUTES)
    app.state.console = Console(
        settings=settings,
        backend=backend,
        gate=gate,
        sessions=sessions or Sessions(web.session_lifetime, web.max_sessions),
        templates=templates(),
        secure=secure,
        admins=frozenset(web.admins),
        cluster=cluster,
    )
    return app
