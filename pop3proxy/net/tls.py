"""TLS contexts for the listeners (POP3 and SMTP share them) and for connections to providers."""

from __future__ import annotations

import logging
import ssl
import warnings
from pathlib import Path

log = logging.getLogger("pop3proxy")


def server_context(certfile: Path, keyfile: Path | None = None, min_version: str = "1.2") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if min_version in ("1.0", "1.1"):
        # Legacy clients: OpenSSL's default security level refuses TLS 1.0/1.1 outright.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        log.warning("TLS %s allowed for clients: only for legacy clients that cannot do better", min_version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 only when asked for
        ctx.minimum_version = {
            "1.0": ssl.TLSVersion.TLSv1,
            "1.1": ssl.TLSVersion.TLSv1_1,
            "1.2": ssl.TLSVersion.TLSv1_2,
            "1.3": ssl.TLSVersion.TLSv1_3,
        }[min_version]
    ctx.load_cert_chain(str(certfile), str(keyfile or certfile))
    return ctx


CLIENT_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def client_context(ca_file: str | None = None, min_version: str = "1.2") -> ssl.SSLContext:
    """A context for connecting to a provider (POP3 and SMTP alike): the certificate is always verified
    against ``ca_file`` (the system store when empty) and the host name checked; TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = CLIENT_VERSIONS[min_version]
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context
