"""Peer addresses: whether a client is on this machine (one rule for POP3 and SMTP)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether a peer address is this machine. The empty string means there is no network peer (a unix
    socket, an in-memory stream): local. Anything else that is not an IP address is not loopback."""
    if host == "":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
