"""One service per POP3 port, and who holds a port that is in use.

The worker processes of one service share its ports with SO_REUSEPORT, and the kernel lets any
process of the same user join such a port: a second service (an old one not stopped, a manual
`serve` beside the systemd unit) would silently take half of the connections. So every service
claims each address it serves with a listening Unix socket in the abstract namespace, named after
the address. The name is the network namespace's, like the port (a private /tmp does not hide it),
goes away with the process that holds it (nothing stale after a crash), and a process that finds
it taken learns the holder's pid from the kernel (SO_PEERCRED). A name held by another user is not
ours to obey: that user's processes cannot join our ports anyway, so the kernel's bind decides.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger("pop3proxy")

PREFIX = "pop3proxy-port:"


def _name(ip: str, port: int) -> str:
    return f"{PREFIX}{ip}:{port}"


def _holder(name: str) -> tuple[int, int] | None:
    """(pid, uid) of the process listening on the abstract socket ``name``, if it can be found."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog (probes are never accepted) is no answer, not a wait
        try:
            probe.connect("\0" + name)
            pid, uid, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return None
    return (pid, uid) if pid > 0 else None


def _claimed_names(port: int) -> set[str]:
    """The names of the claims of ``port`` now held in this network namespace."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    suffix = f":{port}"
    found = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@" + PREFIX) and fields[7].endswith(suffix):
            found.add(fields[7][1:])
    return found


def _overlaps(ip: str, other: str) -> bool:
    """Whether a listener on ``other`` takes connections meant for ``ip`` (or the other way round)."""
    if (":" in ip) != (":" in other):
        return False  # IPv4 and IPv6 listeners (IPv6 ones are IPv6-only)
    wildcard = ("0.0.0.0", "::")
    return ip == other or ip in wildcard or other in wildcard


def describe_holder(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}, {comm}"


class PortInUse(OSError):
    """Another service of this user serves the address; the message names it."""


def claim(ip: str, port: int) -> socket.socket | None:
    """Claim ``ip``:``port`` for this process, for as long as the returned socket stays open; a
    PortInUse naming the holder if another process of this user serves that address or one that
    overlaps it (the wildcard address). None where the claim cannot be made (not Linux, or the name
    is held by another user)."""
    me = os.geteuid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + _name(ip, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            return None
        holder = _holder(_name(ip, port))
        if holder is None:
            raise PortInUse(errno.EADDRINUSE,
                            "already in use by another pop3proxy (its pid could not be found)") from exc
        if holder[1] != me:
            log.warning("the claim of port %d is held by another user (pid %d); not checked", port, holder[0])
            return None
        raise PortInUse(errno.EADDRINUSE, f"already in use by pop3proxy serve ({describe_holder(holder[0])})") from exc
    for name in _claimed_names(port) - {_name(ip, port)}:
        other = name[len(PREFIX):].rsplit(":", 1)[0]
        holder = _holder(name) if _overlaps(ip, other) else None
        if holder is not None and holder[1] == me and holder[0] != os.getpid():
            sock.close()
            raise PortInUse(errno.EADDRINUSE,
                            f"already in use by pop3proxy serve on {other} ({describe_holder(holder[0])})")
    return sock


def _address(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6} (hex, in 32-bit words of host order) as text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def _listening_inodes(port: int, ip: str | None = None) -> set[str]:
    """The sockets listening on ``port`` (on an address that overlaps ``ip``, when given)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) <= 9 or fields[3] != "0A":
                continue
            address, _, hex_port = fields[1].rpartition(":")
            if int(hex_port, 16) == port and (ip is None or _overlaps(ip, _address(address))):
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _pids_holding(inodes: set[str]) -> list[int]:
    pids: list[int] = []
    if not inodes:
        return pids
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def listening_pids(port: int) -> list[int]:
    """The processes that have a TCP socket listening on ``port`` (those this user may look at)."""
    return _pids_holding(_listening_inodes(port))


def check_not_served(ip: str, port: int) -> None:
    """PortInUse if a socket already listens on ``ip``:``port`` (or an overlapping address): called
    by a supervising process before its workers listen, it finds a process of this user sharing the
    port with SO_REUSEPORT that holds no claim (another program, a pop3proxy of an older version)."""
    inodes = _listening_inodes(port, ip)
    if inodes:
        pids = _pids_holding(inodes)
        holder = "; ".join(describe_holder(pid) for pid in pids[:3]) or "a process whose pid could not be found"
        raise PortInUse(errno.EADDRINUSE, f"address already in use (by {holder})")


def bind_error(exc: OSError, port: int) -> str:
    """Why a port could not be bound, in a few words; for a port in use, who holds it."""
    if isinstance(exc, PortInUse):
        return str(exc.strerror)
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno != errno.EADDRINUSE:
        return reason
    holders = [_holder(name) for name in _claimed_names(port)]
    pids = sorted({holder[0] for holder in holders if holder is not None}) or listening_pids(port)
    if not pids:
        return f"{reason} (by a process whose pid could not be found)"
    return f"{reason} (by {'; '.join(describe_holder(pid) for pid in pids[:3])})"


def claim_bound(addresses: list[Any]) -> list[socket.socket]:
    """Claims for the addresses (``getsockname()``) of the sockets a service has bound; PortInUse
    if another service of this user serves one of them."""
    claims: list[socket.socket] = []
    try:
        for address in addresses:
            sock = claim(address[0], address[1])
            if sock is not None:
                claims.append(sock)
    except BaseException:
        for sock in claims:
            sock.close()
        raise
    return claims
