"""Signing in and out of the console, and its style sheet (served without a session).

A sign-in is a login like a POP3 one: the same backend, the same throttle (per address and account).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import trio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from pop3proxy.errors import LoginError
from pop3proxy.web.console import COOKIE, LOGIN_COOKIE, Fields, Forbidden, console, guarded, read_form
from pop3proxy.web.sessions import Session

log = logging.getLogger("pop3proxy.web")


async def login_page(request: Request, error: str = "", status: int = 200) -> Response:
    here = console(request)
    token = secrets.token_urlsafe(32)
    response = here.page(request, None, "login.html", status, csrf=token, error=error)
    here.cookie(response, LOGIN_COOKIE, token, 600)
    return response


async def login_get(request: Request) -> Response:
    if console(request).current(request) is not None:
        return RedirectResponse("/", status_code=303)
    return await login_page(request)


async def login_post(request: Request) -> Response:
    here = console(request)
    try:
        fields = await read_form(request)
    except Forbidden:
        return await login_page(request, "form too large", 413)
    expected = request.cookies.get(LOGIN_COOKIE, "")
    given = fields.get("csrf", "")
    if not expected or not secrets.compare_digest(expected.encode(), given.encode()):
        return here.page(request, None, "error.html", 403, message="missing or wrong CSRF token")
    user, password = fields.get("user", ""), fields.get("password", "")
    address = request.client.host if request.client else "?"
    if not user or not password:
        return await login_page(request, "give your user name and password", 400)
    account = here.backend.account_key(user)  # the same keys as POP3 logins: one throttle for both doors
    try:
        async with here.gate.login(address, account) as attempt:
            if attempt.blocked:
                log.warning("console sign-in of %r from %s refused: too many failed logins", user, address)
                return await login_page(request, "too many failed logins, try again later", 429)
            await trio.sleep(attempt.delay)
            try:
                maildrop = await here.backend.login(user, password, address)
            except LoginError as exc:
                log.info("console sign-in failed for %r from %s: %s", user, address, exc.text)
                if (exc.code == "AUTH" or exc.guess) and not exc.verified:
                    await trio.sleep(await attempt.failed())
                if exc.code == "AUTH" and not exc.verified:
                    return await login_page(request, "invalid user name or password", 401)
                return await login_page(request, f"cannot sign in now: {exc.text}", 503)
            attempt.succeeded()
    except LoginError as exc:  # the gate cannot count logins now (a cluster's database): temporary
        return await login_page(request, f"cannot sign in now: {exc.text}", 503)
    await maildrop.close()  # the console reads the store itself; the mailbox lock is given back
    log.info("console sign-in of %r from %s", user, address)
    response = RedirectResponse("/", status_code=303)
    here.cookie(response, COOKIE, here.sessions.create(user, user in here.admins),
                int(here.settings.web.session_lifetime))
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@guarded(post=True)
async def logout(request: Request, session: Session, fields: Fields) -> Response:
    console(request).sessions.end(request.cookies.get(COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def style(request: Request) -> Response:
    return Response((Path(__file__).parent / "style.css").read_text(), media_type="text/css")
