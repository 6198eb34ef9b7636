"""Held mail: messages the filter pipeline kept out of a user's served mailbox.

A message is held when a filter with ``on_error = "hold"`` failed on it, or quarantined when a filter
said so (spam, say). Either way it goes to ``held/`` in the user's cache directory: a Maildir that POP3
clients never see, plus one small JSON file per message in ``held/meta/`` that says why (the upstream
UIDL, the action, the filters' verdicts and errors, the time). ``pop3proxy held`` lists, releases and
deletes held messages.

Crash safety: a message is written (fsync'ed) before its metadata, and the metadata atomically
(write, fsync, rename). A message whose metadata was never written is still listed, and adopted by the
next ``add`` of the same bytes, so a sync that is repeated after a crash does not hold a message twice.
``release`` marks the metadata before it copies the message into the served mailbox, and a repeated
release after a crash finds that copy instead of making a second one.

Synchronous code, like ``store``; callers in trio run it in worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

from pop3proxy.filtering.api import FilterResult
from pop3proxy.filtering.headers import split_header
from pop3proxy.store import open_store
from pop3proxy.store.base import Mailbox, MessageInfo
from pop3proxy.store.crlf import normalise
from pop3proxy.store.fsutil import DIR_MODE, fsync_dir, replace_file
from pop3proxy.store.locks import lock_mailbox
from pop3proxy.store.maildir import MaildirMailbox
from pop3proxy.store.paths import decode_user, user_dir, user_label
from pop3proxy.store.state import UserState

__all__ = ["HeldError", "HeldItem", "HeldOwner", "HeldStore", "held_owners", "hold_callback", "mark_released"]

log = logging.getLogger("pop3proxy.store.held")

HELD_DIR = "held"
META_DIR = "meta"
STATE_DB = "state.db"
_META_VERSION = 1
_TAG_LENGTH = 16
_SUMMARY_BYTES = 64 * 1024


class HeldError(Exception):
    """A held-mail operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class HeldItem:
    """One held message. ``reasons`` are the filters' errors, then their verdicts."""

    key: str
    uid: str  # the upstream UIDL; "" when the metadata was lost
    action: str  # "hold" or "quarantine"
    reasons: tuple[str, ...]
    size: int  # octets, CRLF form
    time: float  # when it was held (seconds since the epoch)
    sender: str = ""  # From and Subject, decoded, to tell messages apart (never the body)
    subject: str = ""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _uid_tag(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:_TAG_LENGTH]


def _header_text(raw: bytes) -> str:
    """A header field's value as one line of text for people (RFC 2047 decoded, control characters
    dropped, at most 120 characters)."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    text = " ".join(value.decode("utf-8", "replace").split())
    with contextlib.suppress(Exception):  # a malformed encoded word: show it as it is
        text = str(make_header(decode_header(text)))
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= 120 else text[:117] + "..."


def _time_from_key(key: str) -> float:
    match = re.match(r"(\d+)\.", key)
    return float(match[1]) if match else 0.0


class HeldStore:
    """The held mail of one user: ``user_dir(root, user)/held``.

    ``backend`` is the format of the user's served mailbox (``cache.backend``), where ``release`` puts a
    message back.
    """

    def __init__(self, root: str | os.PathLike[str], user: str, backend: str = "maildir") -> None:
        self.root = Path(root)
        self.user: str | None = user
        self.backend = backend
        self.user_dir = user_dir(root, user)
        self.path = self.user_dir / HELD_DIR
        self._meta = self.path / META_DIR

    @classmethod
    def of_directory(cls, directory: Path, backend: str = "maildir") -> HeldStore:
        """The held mail in a user directory whose user name is unknown: it can be listed and read."""
        store = cls.__new__(cls)
        store.root, store.user, store.backend = directory.parent, None, backend
        store.user_dir = directory
        store.path = directory / HELD_DIR
        store._meta = store.path / META_DIR
        return store

    # -- the parts on disk -------------------------------------------------------------------------

    def _exists(self) -> bool:
        return (self.path / "new").is_dir()

    def _mailbox(self) -> MaildirMailbox:
        """The held Maildir, created (with the user directory, mode 0700) on first use."""
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.user_dir.mkdir(mode=DIR_MODE, exist_ok=True)
        mailbox = MaildirMailbox(self.path, create=True)
        self._meta.mkdir(mode=DIR_MODE, exist_ok=True)
        return mailbox

    def _meta_files(self) -> dict[str, Path]:
        """Held key → its metadata file (``<uid tag>.<key>.json``)."""
        files: dict[str, Path] = {}
        try:
            with os.scandir(self._meta) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(".") or not name.endswith(".json") or len(name) <= _TAG_LENGTH + 6:
                        continue
                    files[name[_TAG_LENGTH + 1 : -5]] = Path(entry.path)
        except FileNotFoundError:
            pass
        return files

    @staticmethod
    def _read_meta(path: Path | None) -> dict[str, Any] | None:
        if path is None:
            return None
        try:
            meta = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("unreadable held-mail metadata %s: %s", path.name, exc)
            return None
        return meta if isinstance(meta, dict) else None

    def _write_meta(self, key: str, meta: dict[str, Any]) -> None:
        path = self._meta / f"{_uid_tag(str(meta.get('uid', '')))}.{key}.json"
        replace_file(path, json.dumps(meta, ensure_ascii=True, sort_keys=True).encode("ascii"))

    @staticmethod
    def _file_digest(mailbox: Mailbox, key: str) -> str:
        h = hashlib.sha256()
        with mailbox.open(key) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    # -- the API -----------------------------------------------------------------------------------

    def add(self, data: bytes, uid: str, result: FilterResult) -> str:
        """Hold a message (atomically, fsync'ed) and say why; returns its held key.

        The same message (same upstream uid, same bytes) added again returns the key it already has.
        """
        data = normalise(data)
        digest = _digest(data)
        mailbox = self._mailbox()
        try:
            infos = mailbox.list()
            metas = self._meta_files()
            tag = _uid_tag(uid)
            for info in infos:
                path = metas.get(info.key)
                if path is not None:
                    if path.name.startswith(tag):
                        meta = self._read_meta(path)
                        if meta and meta.get("uid") == uid and meta.get("digest") == digest:
                            return info.key
                elif info.size == len(data) and self._file_digest(mailbox, info.key) == digest:
                    key = info.key  # held before a crash, its metadata never written: adopt it
                    break
            else:
                key = mailbox.add(data).key
        finally:
            mailbox.close()
        self._write_meta(
            key,
            {
                "version": _META_VERSION,
                "uid": uid,
                "action": result.action if result.action != "deliver" else "hold",
                "verdicts": list(result.verdicts),
                "errors": list(result.errors),
                "time": time.time(),
                "digest": digest,
            },
        )
        log.info("held %s of %r as %s (%s)", uid, self.user, key, result.action)
        return key

    def list(self) -> list[HeldItem]:
        """Every held message, oldest first. Nothing is created when the user has no held mail."""
        if not self._exists():
            return []
        mailbox = MaildirMailbox(self.path, create=False)
        try:
            infos = mailbox.list()
        finally:
            mailbox.close()
        metas = self._meta_files()
        items = []
        for info in infos:
            try:
                sender, subject = self._summary(info.key)
            except (KeyError, OSError):  # deleted meanwhile
                continue
            meta = self._read_meta(metas.get(info.key)) or {}
            errors = [str(e) for e in meta.get("errors", [])]
            verdicts = [str(v) for v in meta.get("verdicts", [])]
            reasons = tuple(errors + verdicts) if meta else ("(why it was held is not recorded)",)
            items.append(
                HeldItem(
                    key=info.key,
                    uid=str(meta.get("uid", "")),
                    action=str(meta.get("action", "hold")),
                    reasons=reasons,
                    size=info.size,
                    time=float(meta.get("time", _time_from_key(info.key))),
                    sender=sender,
                    subject=subject,
                )
            )
        return items

    def _summary(self, key: str) -> tuple[str, str]:
        """From and Subject of a held message, read from its header block only."""
        mailbox = MaildirMailbox(self.path, create=False)
        try:
            with mailbox.open(key) as f:
                head = f.read(_SUMMARY_BYTES)
        finally:
            mailbox.close()
        fields, _ = split_header(head)
        found = {"from": "", "subject": ""}
        for fld in fields:
            name = (fld.name or "").lower()
            if name in found and not found[name]:
                found[name] = _header_text(fld.raw)
        return found["from"], found["subject"]

    def get(self, key: str) -> bytes:
        """The held message's bytes (CRLF form). Raises KeyError if there is no such held message."""
        if not self._exists():
            raise KeyError(key)
        mailbox = MaildirMailbox(self.path, create=False)
        try:
            with mailbox.open(key) as f:
                return f.read()
        finally:
            mailbox.close()

    def release(self, key: str, *, lock: bool = True) -> MessageInfo:
        """Move a held message into the user's served mailbox; its state row becomes ``cached``.

        Takes the user's mailbox lock (raising store.MailboxBusy while a session or a sync has it) unless
        ``lock`` is False because the caller holds it. Raises KeyError for an unknown key.
        """
        if self.user is None:
            raise HeldError("the user of this held mail is not known: name the user to release it")
        data = self.get(key)
        held_lock = lock_mailbox(self.root, self.user) if lock else None
        try:
            return self._release_locked(key, data)
        finally:
            if held_lock is not None:
                held_lock.release()

    def _release_locked(self, key: str, data: bytes) -> MessageInfo:
        assert self.user is not None
        meta_path = self._meta_files().get(key)
        meta = self._read_meta(meta_path)
        digest = _digest(data)
        served = open_store(self.root, self.user, self.backend)
        try:
            state = UserState(self.user_dir / STATE_DB)
            try:
                uid = meta.get("uid") if meta else None
                info = None
                if meta is None or meta.get("releasing"):
                    info = _find_copy(served, state, uid, digest, len(data))
                if info is None:
                    if meta is not None:
                        self._write_meta(key, {**meta, "releasing": True})
                    info = served.add(data)
                mark_released(state, key, uid, info)
            finally:
                state.close()
        finally:
            served.close()
        self._remove(key)
        log.info("released held message %s of %r as %s", key, self.user, info.key)
        return info

    def delete(self, key: str) -> None:
        """Delete a held message for good. Its state row stays, so it is never fetched again."""
        found = key in self._meta_files()
        if self._exists():
            mailbox = MaildirMailbox(self.path, create=False)
            try:
                found = found or any(info.key == key for info in mailbox.list())
            finally:
                mailbox.close()
        if not found:
            raise KeyError(key)
        self._remove(key)
        log.info("deleted held message %s of %r", key, self.user)

    def _remove(self, key: str) -> None:
        """The message first, then its metadata: a crash in between leaves only a stale metadata file."""
        if self._exists():
            mailbox = MaildirMailbox(self.path, create=False)
            try:
                mailbox.list()  # MaildirMailbox.delete finds only keys it has seen
                mailbox.delete([key])
            finally:
                mailbox.close()
        path = self._meta_files().get(key)
        if path is not None:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)


def _find_copy(served: Mailbox, state: UserState, uid: str | None, digest: str, size: int) -> MessageInfo | None:
    """A copy of the message already in the served mailbox that a release interrupted by a crash left:
    same bytes, and either no state row owns it or the row of this very uid does."""
    owners = {row.key: row.uid for row in state.rows() if row.key}
    for info in served.list():
        if info.size != size:
            continue
        owner = owners.get(info.key)
        if owner is not None and owner != uid:
            continue
        if HeldStore._file_digest(served, info.key) == digest:
            return info
    return None


def mark_released(state: UserState, held_key: str, uid: str | None, info: MessageInfo) -> None:
    """The held message ``held_key`` is served now as ``info`` (see ``UserState.release_held``)."""
    state.release_held(held_key, uid, info.key, info.size)


def hold_callback(root: str | os.PathLike[str], user: str) -> Callable[[bytes, str, FilterResult], str]:
    """The ``hold`` argument of ``sync.sync_mailbox``: holds a message for ``user``, returns its key."""

    def hold(data: bytes, uid: str, result: FilterResult) -> str:
        return HeldStore(root, user).add(data, uid, result)

    return hold


# -- finding held mail -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOwner:
    """A user directory with held mail. ``user`` is None when the directory name does not give the user
    name back (very long names are shortened with a digest); ``label`` then shows its beginning."""

    user: str | None
    directory: Path

    @property
    def label(self) -> str:
        if self.user is not None:
            return self.user
        return user_label(self.directory.name)

    def store(self, root: str | os.PathLike[str], backend: str = "maildir") -> HeldStore:
        if self.user is not None:
            return HeldStore(root, self.user, backend)
        return HeldStore.of_directory(self.directory, backend)


def _user_of(directory: Path) -> str | None:
    return decode_user(directory.name)


def held_owners(root: str | os.PathLike[str]) -> list[HeldOwner]:
    """Every user directory under ``root`` that has held mail, sorted by name."""
    root = Path(root)
    owners = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and (Path(entry.path) / HELD_DIR / "new").is_dir():
            owners.append(HeldOwner(_user_of(Path(entry.path)), Path(entry.path)))
    return owners
