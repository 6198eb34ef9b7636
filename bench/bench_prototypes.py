"""Bench-only prototypes of serving-path speed-ups, to measure before anyone changes pop3proxy.

``python -m bench.bench_prototypes serve --config FILE`` is ``pop3proxy serve`` with the patches named
in the environment variable ``BENCH_PATCHES`` (comma-separated) applied first. Nothing here is used by
pop3proxy itself; each patch is a copy of one function with one idea changed:

* ``onehop``: RETR of a message that fits in one read costs one worker-thread hop instead of two (a short
  read already proves the end of the file), and the terminating ``.`` goes out in the same send as the
  body instead of in a send of its own.
* ``nohop``: like ``onehop`` for messages up to 256 KiB, but read in the event-loop thread (no hop).
* ``sendfile``: on plain TCP, a message stored in CRLF form that needs no dot-stuffing is sent with
  ``os.sendfile`` (trio's ``wait_writable`` when the socket is full); the stuffing check scans an mmap.
* ``uidl``: ``session.wire_uid`` checks a uid with one compiled regular expression instead of a Python
  loop over its characters.
* ``recover``: the recovery pass at the start of each sync returns at once when the state database
  has no unfinished fetch and no deleted-but-present message (it lists the whole Maildir otherwise).
  Only equivalent to the code it replaces while ``recover`` has no other check that needs the listing.
* ``index``: ``MaildirMailbox.list`` keeps the listing in an index file beside new/ and cur/, reused
  while neither directory changed (by mtime), so a login does not stat every message file.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import pickle
import re
import sys

import trio

from pop3proxy import pop3 as p
from pop3proxy import store
from pop3proxy.net import pop3_server as server
from pop3proxy.pop3 import session

READ_CHUNK = server.READ_CHUNK
NOHOP_LIMIT = 256 * 1024


def _error_end(self, stuffer: p.DotStuffer, action, exc: BaseException) -> None:
    server.log.error("cannot read message %s of %r: %s", action.key, self.session.user, exc)
    self.out.append(stuffer.finish())


async def _rest(self, f, stuffer: p.DotStuffer, chunk: bytes) -> None:
    """The original loop for what did not fit in the first read."""
    try:
        while chunk:
            self.out.append(stuffer.feed(chunk))
            if stuffer.done:
                break
            await self.flush()
            chunk = await trio.to_thread.run_sync(f.read, READ_CHUNK)
        self.out.append(stuffer.finish())
    finally:
        f.close()


def _read_first(maildrop, key: str):
    """(file or None when the whole message was read, first chunk)."""
    f = maildrop.open(key)
    try:
        chunk = f.read(READ_CHUNK)
    except BaseException:
        f.close()
        raise
    if len(chunk) < READ_CHUNK:  # BufferedReader.read(n) returns less only at the end of the file
        f.close()
        return None, chunk
    return f, chunk


async def _maybe_flush(self) -> None:
    if sum(map(len, self.out)) >= READ_CHUNK:
        await self.flush()


async def send_message_onehop(self, action) -> None:
    maildrop = self.maildrop
    stuffer = p.DotStuffer(action.top_lines)
    try:
        f, chunk = await trio.to_thread.run_sync(_read_first, maildrop, action.key)
    except (OSError, KeyError) as exc:
        _error_end(self, stuffer, action, exc)
        return
    if f is None:
        self.out.append(stuffer.feed(chunk))
        self.out.append(stuffer.finish())
        await _maybe_flush(self)
        return
    await _rest(self, f, stuffer, chunk)


def _size_of(self, key: str) -> int | None:
    sizes = getattr(self, "_bench_sizes", None)
    if sizes is None:
        sizes = self._bench_sizes = {m.key: m.size for m in self.maildrop.messages}
    return sizes.get(key)


async def send_message_nohop(self, action) -> None:
    size = _size_of(self, action.key)
    if size is None or size > NOHOP_LIMIT:
        return await send_message_onehop(self, action)
    stuffer = p.DotStuffer(action.top_lines)
    try:
        f, chunk = _read_first(self.maildrop, action.key)
    except (OSError, KeyError) as exc:
        _error_end(self, stuffer, action, exc)
        return
    if f is None:
        self.out.append(stuffer.feed(chunk))
        self.out.append(stuffer.finish())
        await _maybe_flush(self)
        return
    await _rest(self, f, stuffer, chunk)


def _open_for_sendfile(maildrop, key: str):
    """(fd, size, ends with CRLF) when the message can go out as stored, else (file, first chunk) for the
    ordinary path."""
    f = maildrop.open(key)
    try:
        raw = getattr(f, "raw", None)
        if isinstance(raw, io.FileIO):
            fd = f.fileno()
            size = os.fstat(fd).st_size
            if size:
                with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as m:
                    clean = m[:1] != b"." and m.find(b"\n.") < 0
                    crlf_end = m[size - 2 : size] == b"\r\n"
                if clean:
                    return ("sendfile", f, size, crlf_end)
        return ("read", f, f.read(READ_CHUNK), None)
    except BaseException:
        f.close()
        raise


async def send_message_sendfile(self, action) -> None:
    stream = self.stream
    if action.top_lines is not None or not isinstance(stream, trio.SocketStream):
        return await send_message_onehop(self, action)
    stuffer = p.DotStuffer(None)
    try:
        kind, f, a, b = await trio.to_thread.run_sync(_open_for_sendfile, self.maildrop, action.key)
    except (OSError, KeyError) as exc:
        _error_end(self, stuffer, action, exc)
        return
    if kind == "read":
        await _rest(self, f, stuffer, a)
        return
    size, crlf_end = a, b
    try:
        await self.flush()
        sock_fd = stream.socket.fileno()
        offset = 0
        with trio.fail_after(self.config.idle_timeout):
            while offset < size:
                try:
                    sent = os.sendfile(sock_fd, f.fileno(), offset, size - offset)
                except BlockingIOError:
                    sent = None
                if sent == 0:
                    raise trio.BrokenResourceError("sendfile sent nothing")
                if sent is None:
                    await trio.lowlevel.wait_writable(sock_fd)
                    continue
                offset += sent
        self.bytes_sent += size
    finally:
        f.close()
    self.out.append(b".\r\n" if crlf_end else b"\r\n.\r\n")


_WIRE_UID = re.compile(r"[\x21-\x7e]{1,70}")


def wire_uid_fast(uid: str) -> str:
    if _WIRE_UID.fullmatch(uid):
        return uid
    return "h" + hashlib.sha1(uid.encode("utf-8", "surrogatepass")).hexdigest()


# --- a listing index for Maildir --------------------------------------------------------------------

INDEX_NAME = ".bench-listing"
_original_open = store.MaildirMailbox.open


def _dir_stamp(mailbox) -> tuple:
    new, cur = os.stat(mailbox._subdirs["new"]), os.stat(mailbox._subdirs["cur"])
    return (new.st_ino, new.st_mtime_ns, cur.st_ino, cur.st_mtime_ns)


def indexed_list(self) -> list:
    stamp = _dir_stamp(self)
    path = self.path / INDEX_NAME
    table = None
    try:
        with open(path, "rb") as f:
            saved_stamp, saved = pickle.load(f)
        if saved_stamp == stamp:
            table = saved
    except (OSError, EOFError, pickle.UnpicklingError, ValueError):
        pass
    if table is None:
        infos = _plain_list(self)
        table = [(info.key, os.path.relpath(self._entries[info.key].path, self.path), self._entries[info.key].crlf,
                  info.size) for info in infos]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump((stamp, table), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    self._bench_index = {uid: (rel, crlf) for uid, rel, crlf, _ in table}
    info = store.MessageInfo
    return [info(uid, uid, size) for uid, _, _, size in table]


def indexed_open(self, key: str):
    entry = getattr(self, "_bench_index", {}).get(key)
    if entry is not None and entry[1]:
        try:
            return open(os.path.join(self.path, entry[0]), "rb")
        except FileNotFoundError:
            pass
    return _original_open(self, key)


_plain_list = store.MaildirMailbox.list
_original_recover = __import__("pop3proxy.proxy.sync", fromlist=["recover"]).recover


def _recover_fast(mailbox, state):
    if not state.fetching() and not state.hidden_keys():
        return 0, 0
    return _original_recover(mailbox, state)


def apply(names: list[str]) -> None:
    for name in names:
        if name == "onehop":
            server._Connection._send_message = send_message_onehop
        elif name == "nohop":
            server._Connection._send_message = send_message_nohop
        elif name == "sendfile":
            server._Connection._send_message = send_message_sendfile
        elif name == "uidl":
            session.wire_uid = wire_uid_fast
        elif name == "recover":
            from pop3proxy.proxy import backend as proxy

            proxy.recover = _recover_fast
        elif name == "index":
            store.MaildirMailbox.list = indexed_list
            store.MaildirMailbox.open = indexed_open
        elif name:
            raise SystemExit(f"bench_prototypes: unknown patch {name!r}")


def main() -> int:
    apply([n.strip() for n in os.environ.get("BENCH_PATCHES", "").split(",") if n.strip()])
    from pop3proxy.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
