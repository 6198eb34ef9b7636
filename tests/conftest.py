"""Shared fixtures: TLS material, a pop3proxy server process, and the real Dovecot."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import trustme
from helpers.browser import browser  # noqa: F401  (fixture)
from helpers.common import ServerProcess
from helpers.dovecot import dovecot, dovecot_server  # noqa: F401  (fixtures)
from helpers.postgres import own_postgres, postgres_db, postgres_server  # noqa: F401  (fixtures)
from helpers.proxy import Proxy


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(certfile, keyfile, ca_file) for a server named localhost / 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(ca_file))
    return certfile, keyfile, ca_file


@pytest.fixture
def server_process() -> Iterator[type[ServerProcess]]:
    """A factory; every process it made is stopped after the test."""
    made: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    yield Tracked
    for proc in made:
        proc.stop()
from helpers.oauth_server import oauth_dovecot, oidc_server, short_oidc  # noqa: F401,E402  (fixtures)


@pytest.fixture
def proxy(server_process, tmp_path, dovecot):
    """A pop3proxy process in front of the test's Dovecot (helpers.proxy.Proxy); no password in its log."""
    made = Proxy(server_process, tmp_path, dovecot)
    yield made
    log = made.output()
    made.stop()
    # No password ever reaches the log.
    assert log and dovecot.password not in log
