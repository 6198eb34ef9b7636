"""The web console: held mail, spam training, sync status and plots (off unless ``web.port`` is set).

An ASGI application (Starlette) served inside the trio process by Hypercorn's trio worker, over HTTPS
when ``listen.certfile`` is set.
"""

from __future__ import annotations

import logging

import trio

from pop3proxy.admin.cluster_view import ClusterWatch
from pop3proxy.config import Settings
from pop3proxy.errors import ListenError, sole_exception
from pop3proxy.net.backend_api import Backend
from pop3proxy.store.api import Counters

log = logging.getLogger("pop3proxy")

__all__ = ["serve_web"]


async def serve_web(
    settings: Settings,
    backend: Backend,
    gate: Counters,
    *,
    cluster: ClusterWatch | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the console until cancelled; ``task_status.started`` reports the bound port. ``cluster``: the
    nodes of the cluster this service is a node of, shown to admins."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from pop3proxy.web.app import build_app

    web, listen = settings.web, settings.listen
    config = Config()
    host = f"[{web.host}]" if ":" in web.host else web.host
    config.bind = [f"{host}:{web.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("pop3proxy.web.server")
    config.include_server_header = False
    if listen.certfile is not None:
        config.certfile = str(listen.certfile)
        config.keyfile = str(listen.keyfile or listen.certfile)
    app = build_app(settings, backend, gate, secure=listen.certfile is not None, cluster=cluster)

    class Status:  # a trio.TaskStatus[list[str]]: hypercorn reports the addresses it bound
        def started(self, value: list[str] | None = None) -> None:
            assert value is not None  # hypercorn always passes its binds
            url = value[0]
            port = int(url.rsplit(":", 1)[1])
            log.info("listening for the web console on %s port %d (%s)", web.host, port, url)
            task_status.started(port)

    try:
        # Starlette is an ASGI 3 app, but its Scope/Receive/Send types are not hypercorn's TypedDicts.
        await serve(app, config, task_status=Status())  # type: ignore[arg-type]
    except (OSError, BaseExceptionGroup) as exc:
        error = sole_exception(exc)
        if not isinstance(error, OSError):  # hypercorn's failure to bind, bare or in a (nested) group
            raise
        raise ListenError(
            f"cannot listen for the web console on {web.host}:{web.port}: {(error.strerror or str(error)).lower()}"
        ) from None

