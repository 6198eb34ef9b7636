"""The console's data as JSON under /api/ (401 without a session, errors as ``{"error": ...}``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pop3proxy.web import data
from pop3proxy.web.console import Fields, Forbidden, console, guarded, run
from pop3proxy.web.sessions import Session


@guarded(api=True)
async def api_status(request: Request, session: Session, fields: Fields) -> Response:
    here = console(request)
    accounts = await run(data.accounts, here.settings, session.user, session.admin, here.stores)
    running = here.syncing(accounts)
    return JSONResponse({"user": session.user,
                         "accounts": [{**data.status_json(a), "syncing": running.get(a.name)} for a in accounts],
                         "trained": await run(data.trained, here.settings)})


@guarded(api=True)
async def api_held(request: Request, session: Session, fields: Fields) -> Response:
    items = await run(data.held_list, console(request).settings, session.user, session.admin)
    return JSONResponse([data.held_json(account, item) for account, item in items])


@guarded(api=True)
async def api_plots(request: Request, session: Session, fields: Fields) -> Response:
    return JSONResponse(await run(data.plot_data, console(request).settings, request.path_params["account"]))


@guarded(api=True)
async def api_mail(request: Request, session: Session, fields: Fields) -> Response:
    return JSONResponse(await run(data.cached_list, console(request).settings, request.path_params["account"]))


@guarded(api=True)
async def api_config(request: Request, session: Session, fields: Fields) -> Response:
    if not session.admin:
        raise Forbidden("the configuration is for admins")
    return JSONResponse(await run(data.config_view, console(request).settings))


@guarded(api=True)
async def api_cluster(request: Request, session: Session, fields: Fields) -> Response:
    """The cluster's nodes, their heartbeats and the accounts each serves now (admins); a user's own
    account's node (others). 404 on one machine."""
    here = console(request)
    view = await here.cluster_view()
    if view is None:
        return JSONResponse({"error": "not a cluster: this service runs on one machine"}, status_code=404)
    return JSONResponse(data.cluster_data(here.settings, view, session.user, session.admin))
