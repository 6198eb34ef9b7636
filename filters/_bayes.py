"""The built-in spam classifier: GTUBE detection plus a trainable naive-Bayes token store.

A message stands for its tokens (`pop3proxy.filters._tokens`: words of its telling headers and of
its decoded text parts, link targets, its MIME shape), each counted once. Token probabilities are
Robinson's (with a prior of 0.5 of strength 0.45), combined over the 150 most telling tokens with
Fisher's chi-square method, the scheme SpamBayes uses. The result is a probability that the message
is spam: near 0 ham, near 1 spam, 0.5 unsure.

The store is one sqlite file: token counts, per-class message counts, and a digest of every trained
message, so training the same message twice counts it once, and training it with the other label
moves it. Training and scoring can run at the same time (WAL journal).

``train_command`` is ``pop3proxy train --spam PATH --ham PATH [--database FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import mailbox
import math
import os
import re
import sqlite3
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from pop3proxy.filters._tokens import Reading, tokens

UNKNOWN_WORD_STRENGTH = 0.45
UNKNOWN_WORD_PROB = 0.5
MIN_PROB_STRENGTH = 0.1
MAX_DISCRIMINATORS = 150
_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")


# -- combining ----------------------------------------------------------------------------------


def chi2q(x2: float, v: int) -> float:
    """The probability that chi-square with ``v`` (even) degrees of freedom is at least ``x2``."""
    m = x2 / 2.0
    term = math.exp(-m)
    total = term
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def word_probability(spam_count: int, ham_count: int, nspam: int, nham: int) -> float:
    """Robinson's f(w): the token's spam ratio pulled towards 0.5 when it was seen rarely."""
    spam_ratio = spam_count / nspam if nspam else 0.0
    ham_ratio = ham_count / nham if nham else 0.0
    if spam_ratio + ham_ratio == 0:
        return UNKNOWN_WORD_PROB
    p = spam_ratio / (spam_ratio + ham_ratio)
    n = spam_count + ham_count
    return (UNKNOWN_WORD_STRENGTH * UNKNOWN_WORD_PROB + n * p) / (UNKNOWN_WORD_STRENGTH + n)


def combine(probabilities: Iterable[float]) -> float:
    """Fisher/Robinson chi-square combination of the most telling token probabilities."""
    clues = sorted(
        (p for p in probabilities if abs(p - 0.5) >= MIN_PROB_STRENGTH),
        key=lambda p: abs(p - 0.5),
        reverse=True,
    )[:MAX_DISCRIMINATORS]
    if not clues:
        return 0.5
    clues = [min(max(p, 1e-6), 1 - 1e-6) for p in clues]
    n = len(clues)
    spam_evidence = -2.0 * sum(math.log(1.0 - p) for p in clues)
    ham_evidence = -2.0 * sum(math.log(p) for p in clues)
    s = 1.0 - chi2q(spam_evidence, 2 * n)
    h = 1.0 - chi2q(ham_evidence, 2 * n)
    return (1.0 + s - h) / 2.0


# -- the store ----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, spam INTEGER NOT NULL DEFAULT 0,
                                   ham INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (digest TEXT PRIMARY KEY, label TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counts (label TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
"""
LABELS = ("spam", "ham")


def default_database() -> Path:
    """``$XDG_DATA_HOME/pop3proxy/bayes.sqlite`` (``~/.local/share/...`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "pop3proxy" / "bayes.sqlite"


@dataclass
class Classification:
    probability: float
    nspam: int
    nham: int
    clues: int = 0


@dataclass
class TrainStats:
    learned: dict[str, int] = field(default_factory=lambda: {"spam": 0, "ham": 0})
    relabelled: dict[str, int] = field(default_factory=lambda: {"spam": 0, "ham": 0})
    known: dict[str, int] = field(default_factory=lambda: {"spam": 0, "ham": 0})
    skipped: list[str] = field(default_factory=list)

    def total(self, label: str) -> int:
        return self.learned[label] + self.relabelled[label] + self.known[label]


class NoMessages(Exception):
    """A path given for training holds no message."""

    def __init__(self, label: str, path: str) -> None:
        super().__init__(f"{path}: no messages found")
        self.label, self.path = label, path


class Bayes:
    """The token store at ``path`` (created on the first training)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def create(self) -> None:
        """Create the store if it does not exist yet."""
        db = self._connect(create=True)
        if db is not None:
            db.close()

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if not create and not self.path.exists():
            return None
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        if create:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        return db

    def counts(self) -> tuple[int, int]:
        """(spam, ham) messages trained."""
        db = self._connect(create=False)
        if db is None:
            return 0, 0
        with db:
            return self._counts(db)

    @staticmethod
    def _counts(db: sqlite3.Connection) -> tuple[int, int]:
        try:
            rows = dict(db.execute("SELECT label, n FROM counts").fetchall())
        except sqlite3.OperationalError:
            return 0, 0  # an empty file: nothing trained
        return rows.get("spam", 0), rows.get("ham", 0)

    def classify(self, message: bytes, msg: Reading | None = None) -> Classification:
        db = self._connect(create=False)
        if db is None:
            return Classification(0.5, 0, 0)
        try:
            nspam, nham = self._counts(db)
            if not nspam or not nham:
                return Classification(0.5, nspam, nham)
            words = sorted(tokens(message, msg))
            probabilities = []
            for start in range(0, len(words), 500):
                batch = words[start:start + 500]
                marks = ",".join("?" * len(batch))
                for _, spam, ham in db.execute(
                    f"SELECT token, spam, ham FROM tokens WHERE token IN ({marks})", batch
                ):
                    probabilities.append(word_probability(spam, ham, nspam, nham))
            clues = sum(1 for p in probabilities if abs(p - 0.5) >= MIN_PROB_STRENGTH)
            return Classification(combine(probabilities), nspam, nham, min(clues, MAX_DISCRIMINATORS))
        finally:
            db.close()

    def score(self, message: bytes) -> float:
        """The probability that the message is spam (0.5 while the store knows no spam or no ham)."""
        return self.classify(message).probability

    def learn(self, db: sqlite3.Connection, message: bytes, label: str, stats: TrainStats) -> None:
        """Count one message as ``label`` inside the caller's transaction."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, not {label!r}")
        digest = hashlib.sha256(message).hexdigest()
        row = db.execute("SELECT label FROM messages WHERE digest = ?", (digest,)).fetchone()
        if row is not None and row[0] == label:
            stats.known[label] += 1
            return
        words = tokens(message)
        if row is not None:
            old = row[0]
            db.executemany(
                f"UPDATE tokens SET {old} = MAX({old} - 1, 0) WHERE token = ?", ((w,) for w in words)
            )
            db.execute("UPDATE counts SET n = MAX(n - 1, 0) WHERE label = ?", (old,))
            db.execute("UPDATE messages SET label = ? WHERE digest = ?", (label, digest))
            stats.relabelled[label] += 1
        else:
            db.execute("INSERT INTO messages (digest, label) VALUES (?, ?)", (digest, label))
            stats.learned[label] += 1
        db.executemany(
            f"INSERT INTO tokens (token, {label}) VALUES (?, 1) "
            f"ON CONFLICT(token) DO UPDATE SET {label} = {label} + 1",
            ((w,) for w in words),
        )
        db.execute(
            "INSERT INTO counts (label, n) VALUES (?, 1) ON CONFLICT(label) DO UPDATE SET n = n + 1", (label,)
        )

    def train(
        self,
        spam_paths: Iterable[str | os.PathLike[str]] = (),
        ham_paths: Iterable[str | os.PathLike[str]] = (),
    ) -> TrainStats:
        """Learn every message found in these files and directories (see `iter_messages`).

        All or nothing: a path that holds no message raises `NoMessages` and nothing is stored.
        """
        stats = TrainStats()
        db = self._connect(create=True)
        assert db is not None
        try:
            with db:
                for label, paths in (("spam", spam_paths), ("ham", ham_paths)):
                    for path in paths:
                        before = stats.total(label)
                        for _, data in iter_messages([path], stats.skipped):
                            self.learn(db, data, label, stats)
                        if stats.total(label) == before:
                            raise NoMessages(label, str(path))
        finally:
            db.close()
        return stats

    def train_messages(self, spam: Iterable[bytes] = (), ham: Iterable[bytes] = ()) -> TrainStats:
        """Learn messages given as bytes."""
        stats = TrainStats()
        db = self._connect(create=True)
        assert db is not None
        try:
            with db:
                for label, messages in (("spam", spam), ("ham", ham)):
                    for data in messages:
                        self.learn(db, data, label, stats)
        finally:
            db.close()
        return stats


# -- reading mail from disk ---------------------------------------------------------------------


def looks_like_message(head: bytes) -> bool:
    return bool(_HEADER_LINE.match(head))


def _is_maildir_tmp(directory: Path) -> bool:
    return directory.name == "tmp" and (directory.parent / "cur").is_dir() and (directory.parent / "new").is_dir()


def _read_file(path: Path, skipped: list[str]) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(b"From "):
        box = mailbox.mbox(path, create=False)
        try:
            for key in box.iterkeys():  # iterating a mailbox gives messages, not keys
                yield f"{path}#{key}", box.get_bytes(key)
        finally:
            box.close()
    elif looks_like_message(head):
        yield str(path), path.read_bytes()
    else:
        skipped.append(str(path))


def iter_messages(
    paths: Iterable[str | os.PathLike[str]], skipped: list[str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(origin, bytes) of every message in these paths.

    A file is an mbox (it starts with ``From ``) or one message (it starts with a header line); a
    directory is searched recursively in name order (Maildir ``tmp/`` directories are left out).
    Anything else (index files, notes) is listed in ``skipped``. A path that does not exist is a
    FileNotFoundError.
    """
    skipped = skipped if skipped is not None else []
    for given in paths:
        root = Path(given).expanduser()
        if root.is_file():
            yield from _read_file(root, skipped)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{given}: no such file or directory")
        for directory, dirnames, filenames in os.walk(root):
            here = Path(directory)
            dirnames[:] = sorted(d for d in dirnames if not _is_maildir_tmp(here / d))
            for name in sorted(filenames):
                path = here / name
                if path.is_file():
                    yield from _read_file(path, skipped)


# -- pop3proxy train ----------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pop3proxy train",
        description="Teach the built-in spam filter (use = \"spam\", backend = \"builtin\") what spam "
        "and ham look like. PATH is a message file, an mbox file, or a directory searched "
        "recursively (Maildir, MH, mbox files).",
    )
    parser.add_argument("--spam", action="append", default=[], metavar="PATH", help="spam (repeatable)")
    parser.add_argument("--ham", action="append", default=[], metavar="PATH", help="ham: wanted mail (repeatable)")
    parser.add_argument(
        "--database",
        metavar="FILE",
        help=f"the token store (default: {default_database()}; the filter's 'database' option)",
    )
    return parser


def train_command(argv: list[str]) -> int:
    """``pop3proxy train``: exit 0 when it learned, 2 on a usage, input or database problem."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"pop3proxy train: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if not args.spam and not args.ham:
        print("pop3proxy train: give --spam PATH and/or --ham PATH", file=sys.stderr)
        return 2
    for option, paths in (("--spam", args.spam), ("--ham", args.ham)):
        for path in paths:
            if not Path(path).expanduser().exists():
                print(f"pop3proxy train: {option} {path}: no such file or directory", file=sys.stderr)
                return 2
    database = Path(args.database).expanduser() if args.database else default_database()
    bayes = Bayes(database)
    try:
        stats = bayes.train(args.spam, args.ham)
        nspam, nham = bayes.counts()
    except NoMessages as exc:
        print(f"pop3proxy train: --{exc.label} {exc.path}: no messages found", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"pop3proxy train: {database}: {exc}", file=sys.stderr)
        return 2
    for label, paths in (("spam", args.spam), ("ham", args.ham)):
        if paths:
            other = "ham" if label == "spam" else "spam"
            print(
                f"{label}: {stats.total(label)} messages: {stats.learned[label]} learned, "
                f"{stats.relabelled[label]} moved from {other}, {stats.known[label]} already known"
            )
    if stats.skipped:
        print(f"skipped {len(stats.skipped)} files that are not messages (e.g. {stats.skipped[0]})")
    print(f"{database}: {nspam} spam and {nham} ham messages trained")
    return 0
