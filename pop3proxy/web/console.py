"""What every console route shares: the `Console` (settings, backend, gate, sessions, templates) that
`build_app` puts in ``app.state.console``, the page and cookie helpers, and `guarded`, the sign-in and
CSRF check in front of every route but the sign-in page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

import jinja2
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from pop3proxy.admin.cluster_view import ClusterView, ClusterWatch
from pop3proxy.config import Settings
from pop3proxy.net.backend_api import Backend
from pop3proxy.ops.units import human_age, human_size, utc
from pop3proxy.store.api import Counters
from pop3proxy.web.sessions import Session, Sessions

COOKIE = "pop3proxy_session"
LOGIN_COOKIE = "pop3proxy_login"  # the sign-in form's CSRF token (double submit)
MAX_FORM = 4096  # octets of a form body; every form here is a few short fields
PAGE_POLICY = "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'"

Fields = dict[str, str]
Handler = Callable[[Request, Session, Fields], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class Forbidden(Exception):
    status = 403


class TooLarge(Forbidden):
    status = 413


def templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    result = Jinja2Templates(env=env)
    result.env.filters["size"] = human_size
    result.env.filters["utc"] = utc
    result.env.filters["age"] = human_age
    return result


@dataclass
class Console:
    """One console's settings and the services its routes use."""

    settings: Settings
    backend: Backend
    gate: Counters
    sessions: Sessions
    templates: Jinja2Templates
    secure: bool  # cookies only over HTTPS
    admins: frozenset[str]
    cluster: ClusterWatch | None = None  # the nodes of the cluster this service is a node of

    def cookie(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, httponly=True, secure=self.secure, samesite="strict",
                            path="/")

    def page(self, request: Request, session: Session | None, name: str, status: int = 200, **context) -> Response:
        response = self.templates.TemplateResponse(request, name, {"session": session, **context},
                                                   status_code=status)
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def current(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def syncing(self, accounts) -> dict[str, tuple[int, int]]:
        """Syncs running in this process for these accounts: (new messages stored, to fetch)."""
        running = dict(getattr(self.backend, "syncing", {}))
        return {a.name: running[a.name] for a in accounts if a.name in running}

    @property
    def stores(self):
        """The service's engines (`store.api.Stores`), None for a backend without them."""
        return self.backend.stores

    async def cluster_view(self) -> ClusterView | None:
        """The cluster's nodes (None on one machine), read in a worker thread, bounded in time."""
        return None if self.cluster is None else await run(self.cluster.view)


def console(request: Request) -> Console:
    return request.app.state.console


def run(fn, *args):
    """``fn(*args)`` in a worker thread (the console's data is read from disk)."""
    return trio.to_thread.run_sync(partial(fn, *args))


async def read_form(request: Request) -> Fields:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise TooLarge(f"the form is larger than {MAX_FORM} octets")
    return dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=16))


def guarded(*, post: bool = False, api: bool = False) -> Callable[[Handler], Endpoint]:
    """Require a session (else sign-in page or 401), and on POST a valid CSRF token (else 403); an account
    in the URL must be the session's own (or the session an admin's), else 403."""

    def wrap(handler: Handler) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            here = console(request)
            session = here.current(request)
            if session is None:
                if api:
                    return JSONResponse({"error": "sign in first"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            try:
                fields = {}
                if post:
                    fields = await read_form(request)
                    if not session.csrf_ok(fields.get("csrf")):
                        raise Forbidden("missing or wrong CSRF token")
                account = request.path_params.get("account")
                if account is not None and not session.may_see(account):
                    raise Forbidden(f"{account}: not your account")
                return await handler(request, session, fields)
            except Forbidden as exc:
                if api:
                    return JSONResponse({"error": str(exc)}, status_code=exc.status)
                return here.page(request, session, "error.html", exc.status, message=str(exc))

        endpoint.__name__ = endpoint.__qualname__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    return wrap
