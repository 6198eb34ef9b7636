"""The console's routes: pages (Jinja2, autoescaped) and the same data as JSON under /api/.

Every route but the sign-in page needs a session; an account in a URL must be the signed-in user's
own (or the user is in ``web.admins``), else 403. Every POST carries the session's CSRF token.
"""

from __future__ import annotations

import logging
import secrets
import time
from functools import partial
from pathlib import Path

import jinja2
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.net.gate import Gate
from pop3proxy.net.backend_api import Backend
from pop3proxy.ops.units import human_size, utc
from pop3proxy.store.held import HeldError
from pop3proxy.store.locks import MailboxBusy
from pop3proxy.web import data
from pop3proxy.web.plots import charts
from pop3proxy.web.sessions import Session, Sessions

log = logging.getLogger("pop3proxy.web")

COOKIE = "pop3proxy_session"
LOGIN_COOKIE = "pop3proxy_login"  # the sign-in form's CSRF token (double submit)
MAX_FORM = 4096  # octets of a form body; every form here is a few short fields


class Forbidden(Exception):
    status = 403


class TooLarge(Forbidden):
    status = 413


def build_app(settings: Settings, backend: Backend, gate: Gate, *, secure: bool,
              sessions: Sessions | None = None) -> Starlette:
    web = settings.web
    sessions = sessions or Sessions(web.session_lifetime, web.max_sessions)
    admins = set(web.admins)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    templates = Jinja2Templates(env=env)
    templates.env.filters["size"] = human_size
    templates.env.filters["utc"] = utc

    def cookie(response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, httponly=True, secure=secure, samesite="strict", path="/")

    def page(request: Request, session: Session | None, name: str, status: int = 200, **context) -> Response:
        response = templates.TemplateResponse(request, name, {"session": session, **context}, status_code=status)
        response.headers["Content-Security-Policy"] = "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def current(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    async def form(request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                raise TooLarge(f"the form is larger than {MAX_FORM} octets")
        from urllib.parse import parse_qsl

        return dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=16))

    def guarded(handler, *, post: bool = False, api: bool = False):
        """Require a session (else sign-in page or 401), and on POST a valid CSRF token (else 403)."""

        async def endpoint(request: Request) -> Response:
            session = current(request)
            if session is None:
                if api:
                    return JSONResponse({"error": "sign in first"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            try:
                fields = {}
                if post:
                    fields = await form(request)
                    if not session.csrf_ok(fields.get("csrf")):
                        raise Forbidden("missing or wrong CSRF token")
                account = request.path_params.get("account")
                if account is not None and not session.may_see(account):
                    raise Forbidden(f"{account}: not your account")
                return await handler(request, session, fields)
            except Forbidden as exc:
                if api:
                    return JSONResponse({"error": str(exc)}, status_code=exc.status)
                return page(request, session, "error.html", exc.status, message=str(exc))

        return endpoint

    def run(fn, *args):
        return trio.to_thread.run_sync(partial(fn, *args))

    # -- sign-in ---------------------------------------------------------------------------------
    async def login_page(request: Request, error: str = "", status: int = 200) -> Response:
        token = secrets.token_urlsafe(32)
        response = page(request, None, "login.html", status, csrf=token, error=error)
        cookie(response, LOGIN_COOKIE, token, 600)
        return response

    async def login_get(request: Request) -> Response:
        if current(request) is not None:
            return RedirectResponse("/", status_code=303)
        return await login_page(request)

    async def login_post(request: Request) -> Response:
        try:
            fields = await form(request)
        except Forbidden:
            return await login_page(request, "form too large", 413)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        given = fields.get("csrf", "")
        if not expected or not secrets.compare_digest(expected.encode(), given.encode()):
            return page(request, None, "error.html", 403, message="missing or wrong CSRF token")
        user, password = fields.get("user", ""), fields.get("password", "")
        address = request.client.host if request.client else "?"
        if not user or not password:
            return await login_page(request, "give your user name and password", 400)
        account = backend.account_key(user)  # the same keys as POP3 logins: one throttle for both doors
        async with gate.login(address, account) as attempt:
            if attempt.blocked:
                log.warning("console sign-in of %r from %s refused: too many failed logins", user, address)
                return await login_page(request, "too many failed logins, try again later", 429)
            await trio.sleep(attempt.delay)
            try:
                maildrop = await backend.login(user, password, address)
            except LoginError as exc:
                log.info("console sign-in failed for %r from %s: %s", user, address, exc.text)
                if (exc.code == "AUTH" or exc.guess) and not exc.verified:
                    await trio.sleep(await attempt.failed())
                if exc.code == "AUTH" and not exc.verified:
                    return await login_page(request, "invalid user name or password", 401)
                return await login_page(request, f"cannot sign in now: {exc.text}", 503)
            attempt.succeeded()
        await maildrop.close()  # the console reads the store itself; the mailbox lock is given back
        log.info("console sign-in of %r from %s", user, address)
        response = RedirectResponse("/", status_code=303)
        cookie(response, COOKIE, sessions.create(user, user in admins), int(web.session_lifetime))
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(request: Request, session: Session, fields) -> Response:
        sessions.end(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages -----------------------------------------------------------------------------------
    def syncing(accounts) -> dict[str, tuple[int, int]]:
        """Syncs running in this process for these accounts: (new messages stored, to fetch)."""
        running = dict(getattr(backend, "syncing", {}))
        return {a.name: running[a.name] for a in accounts if a.name in running}

    async def overview(request: Request, session: Session, fields) -> Response:
        accounts = await run(data.accounts, settings, session.user, session.admin)
        counts = await run(data.trained, settings)
        return page(request, session, "overview.html", accounts=accounts, trained=counts, now=time.time(),
                    syncing=syncing(accounts))

    async def plot(request: Request, session: Session, fields) -> Response:
        kind = request.path_params["kind"]
        svgs = charts(await run(data.plot_data, settings, request.path_params["account"]))
        if kind not in svgs:
            return Response("no such plot", status_code=404, media_type="text/plain")
        return Response(svgs[kind], media_type="image/svg+xml",
                        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    async def held(request: Request, session: Session, fields) -> Response:
        items = await run(data.held_list, settings, session.user, session.admin)
        return page(request, session, "held.html", items=items, trained=await run(data.trained, settings))

    async def held_item(request: Request, session: Session) -> tuple[str, object]:
        account, key = request.path_params["account"], request.path_params["key"]
        item = await run(data.held_item, settings, account, key)
        if item is None:
            raise Forbidden("no such held message (released or deleted?)")
        return account, item

    async def held_detail(request: Request, session: Session, fields) -> Response:
        account, item = await held_item(request, session)
        raw = await run(data.held_store(settings, account).get, item.key)
        return page(request, session, "message.html", account=account, item=item, where="held",
                    view=data.message_view(raw), trained=await run(data.trained, settings))

    async def held_raw(request: Request, session: Session, fields) -> Response:
        account, item = await held_item(request, session)
        raw = await run(data.held_store(settings, account).get, item.key)
        return Response(raw, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="message.eml"'})

    async def held_act(request: Request, session: Session, fields) -> Response:
        account, item = await held_item(request, session)
        store = data.held_store(settings, account)
        action = request.path_params["action"]
        if action not in ("release", "delete"):
            return page(request, session, "error.html", 404, message="no such action")
        try:
            if action == "release":
                await run(store.release, item.key)
                note = "released: it appears at the next POP3 login"
            else:
                await run(store.delete, item.key)
                note = "deleted"
        except KeyError:
            note = "no longer held"
        except MailboxBusy:
            note = "the mailbox is in use (a mail client is connected); try again later"
        except (HeldError, OSError) as exc:
            note = f"failed: {exc}"
        log.info("console: %s %s of %r by %r: %s", action, item.key, account, session.user, note)
        return page(request, session, "done.html", message=f"{item.subject or item.key}: {note}")

    async def mail(request: Request, session: Session, fields) -> Response:
        account = request.path_params["account"]
        messages = await run(data.cached_list, settings, account)
        return page(request, session, "mail.html", account=account, messages=messages,
                    trained=await run(data.trained, settings),
                    svgs=["daily", "scores", "cache"])

    async def train(request: Request, session: Session, fields) -> Response:
        account, where, key = (request.path_params[k] for k in ("account", "where", "key"))
        label = fields.get("label")
        if label not in ("spam", "ham"):
            return page(request, session, "error.html", 400, message="label must be spam or ham")
        if where == "held":
            item = await run(data.held_item, settings, account, key)
            raw = await run(data.held_store(settings, account).get, key) if item else None
        else:
            raw = await run(data.cached_message, settings, account, key)
        if raw is None:
            raise Forbidden("no such message")
        try:
            learnt = await run(data.train, settings, raw, label, account)
        except (ValueError, OSError) as exc:
            log.warning("console: training a message of %r as %s failed: %s", account, label, exc)
            return page(request, session, "error.html", 409, message=f"cannot train: {exc}")
        counts = await run(data.trained, settings)
        log.info("console: %r trained a message of %r as %s", session.user, account, label)
        what = "spam" if label == "spam" else "not spam"
        return page(request, session, "done.html", trained=counts,
                    message=f"learnt as {what}" if learnt else f"already learnt as {what}")

    async def config(request: Request, session: Session, fields) -> Response:
        if not session.admin:
            raise Forbidden("the configuration is for admins")
        import json

        text = json.dumps(await run(data.config_view, settings), indent=2, default=str)
        return page(request, session, "config.html", text=text)

    # -- JSON ------------------------------------------------------------------------------------
    async def api_status(request: Request, session: Session, fields) -> Response:
        accounts = await run(data.accounts, settings, session.user, session.admin)
        running = syncing(accounts)
        return JSONResponse({"user": session.user,
                             "accounts": [{**data.status_json(a), "syncing": running.get(a.name)} for a in accounts],
                             "trained": await run(data.trained, settings)})

    async def api_held(request: Request, session: Session, fields) -> Response:
        items = await run(data.held_list, settings, session.user, session.admin)
        return JSONResponse([data.held_json(account, item) for account, item in items])

    async def api_plots(request: Request, session: Session, fields) -> Response:
        return JSONResponse(await run(data.plot_data, settings, request.path_params["account"]))

    async def api_mail(request: Request, session: Session, fields) -> Response:
        return JSONResponse(await run(data.cached_list, settings, request.path_params["account"]))

    async def api_config(request: Request, session: Session, fields) -> Response:
        if not session.admin:
            raise Forbidden("the configuration is for admins")
        return JSONResponse(await run(data.config_view, settings))

    async def style(request: Request) -> Response:
        return Response((Path(__file__).parent / "style.css").read_text(), media_type="text/css")

    g, p, a = guarded, partial(guarded, post=True), partial(guarded, api=True)
    routes = [
        Route("/login", login_get, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/style.css", style, methods=["GET"]),
        Route("/logout", p(logout), methods=["POST"]),
        Route("/", g(overview), methods=["GET"]),
        Route("/held", g(held), methods=["GET"]),
        Route("/held/{account}/{key}", g(held_detail), methods=["GET"]),
        Route("/held/{account}/{key}/raw", g(held_raw), methods=["GET"]),
        Route("/held/{account}/{key}/{action:str}", p(held_act), methods=["POST"]),
        Route("/mail/{account}", g(mail), methods=["GET"]),
        Route("/plot/{account}/{kind}.svg", g(plot), methods=["GET"]),
        Route("/train/{account}/{where}/{key}", p(train), methods=["POST"]),
        Route("/config", g(config), methods=["GET"]),
        Route("/api/status", a(api_status), methods=["GET"]),
        Route("/api/held", a(api_held), methods=["GET"]),
        Route("/api/plots/{account}", a(api_plots), methods=["GET"]),
        Route("/api/mail/{account}", a(api_mail), methods=["GET"]),
        Route("/api/config", a(api_config), methods=["GET"]),
    ]
    return Starlette(routes=routes)
