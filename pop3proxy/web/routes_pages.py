"""The console's pages: the overview (in a cluster, with its nodes and the accounts each serves for
admins, the node serving their own account for others), held mail (view, release, delete), cached
mail, plots, spam training and the configuration (admins only)."""

from __future__ import annotations

import json
import logging
import time

from starlette.requests import Request
from starlette.responses import Response

from pop3proxy.store.api import MailboxBusy
from pop3proxy.store.held import HeldError, HeldItem
from pop3proxy.web import data
from pop3proxy.web.console import Fields, Forbidden, console, guarded, run
from pop3proxy.web.plots import charts
from pop3proxy.web.sessions import Session

log = logging.getLogger("pop3proxy.web")

PLOT_POLICY = "default-src 'none'; style-src 'unsafe-inline'"


@guarded()
async def overview(request: Request, session: Session, fields: Fields) -> Response:
    here = console(request)
    accounts = await run(data.accounts, here.settings, session.user, session.admin, here.stores)
    counts = await run(data.trained, here.settings)
    view = await here.cluster_view()
    served = data.serving_nodes(here.settings, view, session.user) if view is not None else []
    return here.page(request, session, "overview.html", accounts=accounts, trained=counts, now=time.time(),
                     syncing=here.syncing(accounts), served=served, max_shown=data.MAX_SHOWN_SERVED,
                     cluster=data.cluster_json(view) if view is not None and session.admin else None)


@guarded()
async def plot(request: Request, session: Session, fields: Fields) -> Response:
    kind = request.path_params["kind"]
    svgs = charts(await run(data.plot_data, console(request).settings, request.path_params["account"]))
    if kind not in svgs:
        return Response("no such plot", status_code=404, media_type="text/plain")
    return Response(svgs[kind], media_type="image/svg+xml", headers={"Content-Security-Policy": PLOT_POLICY})


@guarded()
async def held(request: Request, session: Session, fields: Fields) -> Response:
    here = console(request)
    items = await run(data.held_list, here.settings, session.user, session.admin)
    return here.page(request, session, "held.html", items=items, trained=await run(data.trained, here.settings))


async def held_item(request: Request) -> tuple[str, HeldItem]:
    """The held message named in the URL: (account, item), or Forbidden."""
    account, key = request.path_params["account"], request.path_params["key"]
    item = await run(data.held_item, console(request).settings, account, key)
    if item is None:
        raise Forbidden("no such held message (released or deleted?)")
    return account, item


@guarded()
async def held_detail(request: Request, session: Session, fields: Fields) -> Response:
    here = console(request)
    account, item = await held_item(request)
    raw = await run(data.held_store(here.settings, account).get, item.key)
    return here.page(request, session, "message.html", account=account, item=item, where="held",
                     view=data.message_view(raw), trained=await run(data.trained, here.settings))


@guarded()
async def held_raw(request: Request, session: Session, fields: Fields) -> Response:
    account, item = await held_item(request)
    raw = await run(data.held_store(console(request).settings, account).get, item.key)
    return Response(raw, media_type="application/octet-stream",
                    headers={"Content-Disposition": 'attachment; filename="message.eml"'})


@guarded(post=True)
async def held_act(request: Request, session: Session, fields: Fields) -> Response:
    here = console(request)
    account, item = await held_item(request)
    store = data.held_store(here.settings, account)
    action = request.path_params["action"]
    if action not in ("release", "delete"):
        return here.page(request, session, "error.html", 404, message="no such action")
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
    return here.page(request, session, "done.html", message=f"{item.subject or item.key}: {note}")


@guarded()
async def mail(request: Request, session: Session, fields: Fields) -> Response:
    here = console(request)
    account = request.path_params["account"]
    messages = await run(data.cached_list, here.settings, account)
    return here.page(request, session, "mail.html", account=account, messages=messages,
                     trained=await run(data.trained, here.settings), svgs=["daily", "scores", "cache"])


@guarded(post=True)
async def train(request: Request, session: Session, fields: Fields) -> Response:
    here = console(request)
    account, where, key = (request.path_params[k] for k in ("account", "where", "key"))
    label = fields.get("label")
    if label not in ("spam", "ham"):
        return here.page(request, session, "error.html", 400, message="label must be spam or ham")
    if where == "held":
        item = await run(data.held_item, here.settings, account, key)
        raw = await run(data.held_store(here.settings, account).get, key) if item else None
    else:
        raw = await run(data.cached_message, here.settings, account, key)
    if raw is None:
        raise Forbidden("no such message")
    try:
        learnt = await run(data.train, here.settings, raw, label, account)
    except (ValueError, OSError) as exc:
        log.warning("console: training a message of %r as %s failed: %s", account, label, exc)
        return here.page(request, session, "error.html", 409, message=f"cannot train: {exc}")
    counts = await run(data.trained, here.settings)
    log.info("console: %r trained a message of %r as %s", session.user, account, label)
    what = "spam" if label == "spam" else "not spam"
    return here.page(request, session, "done.html", trained=counts,
                     message=f"learnt as {what}" if learnt else f"already learnt as {what}")


@guarded()
async def config(request: Request, session: Session, fields: Fields) -> Response:
    if not session.admin:
        raise Forbidden("the configuration is for admins")
    here = console(request)
    text = json.dumps(await run(data.config_view, here.settings), indent=2, default=str)
    return here.page(request, session, "config.html", text=text)
