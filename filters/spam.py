"""Spam tagging (``use = "spam"``): ask spamd, rspamd or the built-in classifier, then tag.

Every checked message gets SpamAssassin's headers, added on top of the header block so that every
other byte stays as the provider sent it (DKIM signatures stay valid)::

    X-Spam-Flag: YES                     (spam only)
    X-Spam-Score: 1004.2
    X-Spam-Level: **************************************************   (one star a point, at most 50)
    X-Spam-Status: Yes, score=1004.2 required=5.0 tests=GTUBE,MISSING_DATE

``X-Spam-*`` headers the message already carries (from the provider, or forged by the sender) are
left in place; ours come first, and a mail client's filter sees ours first.

Whether a message is spam is decided here, by ``required_score`` (or the user's ``per_user``
threshold), whatever threshold the daemon itself runs with: the daemon only gives the score. For
rspamd, an action listed in ``spam_actions`` (by default ``reject``, ``add header`` and ``rewrite
subject``) also makes it spam; set ``spam_actions = []`` to let the score alone decide.

The built-in backend scores GTUBE at 1000 and maps the trained classifier's spam probability p to
``20 * (p - 0.5)``: from -10 (surely ham) to +10 (surely spam), so the default threshold 5.0 means
p >= 0.75. Until the store holds ``min_trained`` spam and ``min_trained`` ham messages
(``pop3proxy train``), only GTUBE is detected.

With ``action = "quarantine"`` spam is tagged and kept out of the mailbox (the pipeline holds it).
``subject_prefix`` (off by default: it breaks DKIM signatures that cover the Subject) inserts a
marker at the start of the Subject of spam, changing only those bytes.

A daemon that cannot be reached, does not answer within ``io_timeout`` (per connect, read or write;
the table's ``timeout`` still bounds the whole call), or answers nonsense raises an exception: the
pipeline's ``on_error`` decides (deliver with a warning header, or hold).

Training (`SpamFilter.learn`, the web console's "This is spam" / "This is not spam") teaches whichever
backend checks the mail: the built-in classifier's store; spamd's own Bayes through TELL (spamd must
run with ``--allow-tell``); rspamd's Bayes through its controller (``controller``, with
``controller_password`` or ``controller_password_file``). `SpamFilter.trained` gives the (spam, ham)
counts: the built-in store's, rspamd's own (its controller's ``/stat``), and for spamd, which does not
tell, the messages pop3proxy taught it, counted in ``taught_counts``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pop3proxy.filtering import Action, FilterContext, FilterOutcome, add_header, header_end
from pop3proxy.filters._bayes import Bayes, default_database, train_command
from pop3proxy.filters._net import parse_address
from pop3proxy.filters._rspamd import RspamdClient, RspamdController, RspamdError
from pop3proxy.filters._spamd import SpamdClient, SpamdError
from pop3proxy.filters._tokens import has_gtube, parse
from pop3proxy.store.fsutil import replace_file

log = logging.getLogger("pop3proxy.filters.spam")

MAX_STARS = 50
DEFAULT_ADDRESSES = {"spamd": "127.0.0.1:783", "rspamd": "http://127.0.0.1:11333"}
DEFAULT_CONTROLLER = "127.0.0.1:11334"
LABELS = ("spam", "ham")
_TAUGHT_LOCK = threading.Lock()  # one read-count-replace of the spamd counts at a time


class LearnError(ValueError):
    """Training failed: the daemon refused (spamd without --allow-tell, a wrong controller password),
    could not be reached, or its counts could not be read. The text says which, without secrets."""


@dataclass
class Report:
    """A backend's opinion: a score, the rules that hit, and (rspamd) whether its action says spam."""

    score: float
    tests: list[str] = field(default_factory=list)
    spam_hint: bool = False
    note: str = ""


# -- tagging, byte-exact ------------------------------------------------------------------------


def format_score(score: float) -> str:
    return f"{score:.1f}"


def spam_headers(spam: bool, score: float, required: float, tests: list[str]) -> list[tuple[str, str]]:
    """The headers to add, in the order they should appear."""
    status = "Yes" if spam else "No"
    listed = ",".join(tests) if tests else "none"
    headers = [] if not spam else [("X-Spam-Flag", "YES")]
    headers += [
        ("X-Spam-Score", format_score(score)),
        ("X-Spam-Level", "*" * max(0, min(MAX_STARS, int(score)))),
        ("X-Spam-Status", f"{status}, score={format_score(score)} required={format_score(required)} tests={listed}"),
    ]
    return headers


def add_headers(message: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Prepend the headers so they appear in the given order."""
    for name, value in reversed(headers):
        message = add_header(message, name, value)
    return message


_SUBJECT = re.compile(rb"(?im)^subject[ \t]*:([ \t]*)")


def prefix_subject(message: bytes, prefix: str) -> bytes:
    """Insert ``prefix`` at the start of the Subject's text; nothing else changes.

    A Subject that already starts with the prefix is left alone. A message without a Subject gets
    one (the prefix without its trailing space).
    """
    end = header_end(message)
    match = _SUBJECT.search(message, 0, end)
    raw = prefix.encode("ascii")
    if match is None:
        return add_header(message, "Subject", prefix.strip())
    start = match.end()
    if message.startswith(raw.rstrip(), start):
        return message
    if not match.group(1):
        raw = b" " + raw
    return message[:start] + raw + message[start:]


# -- the filter ---------------------------------------------------------------------------------


class SpamFilter:
    name = "spam"
    # Commands this plugin adds to the CLI (`pop3proxy train ...`), found through its entry point.
    commands = {"train": staticmethod(train_command)}

    @staticmethod
    def create_database(path: Path) -> None:
        """Create an empty token store for the built-in backend (it then detects GTUBE only)."""
        Bayes(path).create()

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        backend: Literal["spamd", "rspamd", "builtin"] = Field(
            "builtin", description="Who scores the message: SpamAssassin's spamd, rspamd, or the built-in classifier."
        )
        address: str = Field(
            "",
            description='spamd: "host:port" or a unix socket path (default "127.0.0.1:783"); '
            'rspamd: "http://host:port" or a unix socket path (default "http://127.0.0.1:11333").',
        )
        io_timeout: float = Field(
            30.0, gt=0, description="spamd, rspamd: seconds for the connection and for each read or write."
        )
        required_score: float = Field(5.0, description="A score at or above this is spam.")
        per_user: dict[str, float] = Field(default_factory=dict, description="Thresholds for some users.")
        action: Literal["tag", "quarantine"] = Field(
            "tag", description="What to do with spam: tag it, or tag it and keep it out of the mailbox."
        )
        subject_prefix: str = Field("", description='Put this before the Subject of spam, e.g. "[SPAM] ".')
        max_size: int = Field(
            512000, ge=0, description="Larger messages are not checked (delivered untagged); 0: no limit."
        )
        spam_actions: list[str] = Field(
            default_factory=lambda: ["reject", "add header", "rewrite subject"],
            description="rspamd: these actions make a message spam whatever its score.",
        )
        database: str = Field(
            "", description="builtin: the token store (default $XDG_DATA_HOME/pop3proxy/bayes.sqlite)."
        )
        min_trained: int = Field(
            10, ge=1, description="builtin: spam and ham messages each that the store needs before it is used."
        )
        controller: str = Field(
            "", description='rspamd: its controller, which learns and counts: "host:port", "http://host:port" '
            f'or a unix socket path (default "{DEFAULT_CONTROLLER}").'
        )
        controller_password: SecretStr = Field(
            SecretStr(""), description="rspamd: the controller's password (its enable_password if it has one)."
        )
        controller_password_file: str = Field(
            "", description="rspamd: a file holding the controller's password (mode 0600)."
        )
        taught_counts: str = Field(
            "", description="spamd: where pop3proxy counts the messages it taught spamd "
            "(default $XDG_DATA_HOME/pop3proxy/spamd-taught.json)."
        )

        @field_validator("subject_prefix")
        @classmethod
        def _printable_ascii(cls, value: str) -> str:
            if value and not (value.isascii() and value.isprintable() and value.strip()):
                raise ValueError("must be printable ASCII on one line, not only spaces")
            return value

        @model_validator(mode="after")
        def _backend_options(self) -> SpamFilter.Config:
            if self.backend == "builtin" and self.address:
                raise ValueError("address is for the spamd and rspamd backends")
            if self.backend != "builtin" and self.database:
                raise ValueError("database is for the builtin backend")
            if self.backend == "spamd" and self.address:
                parse_address(self.address)
            if self.backend == "rspamd" and self.address:
                RspamdClient(self.address)
            rspamd_only = [k for k in ("controller", "controller_password_file") if getattr(self, k)]
            if self.controller_password.get_secret_value():
                rspamd_only.append("controller_password")
            if self.backend != "rspamd" and rspamd_only:
                raise ValueError(f"{', '.join(rspamd_only)}: for the rspamd backend")
            if self.controller_password.get_secret_value() and self.controller_password_file:
                raise ValueError("give controller_password or controller_password_file, not both")
            if self.controller:
                RspamdController(self.controller)
            if self.backend != "spamd" and self.taught_counts:
                raise ValueError("taught_counts is for the spamd backend")
            return self

    def __init__(self, config: SpamFilter.Config | None = None) -> None:
        self.config = config = config or self.Config()
        address = config.address or DEFAULT_ADDRESSES.get(config.backend, "")
        self.spamd = SpamdClient(address, config.io_timeout) if config.backend == "spamd" else None
        self.rspamd = RspamdClient(address, config.io_timeout) if config.backend == "rspamd" else None
        self.controller: RspamdController | None = None
        if config.backend == "rspamd":
            password = config.controller_password.get_secret_value()
            if config.controller_password_file:
                path = Path(os.path.expanduser(config.controller_password_file))
                try:
                    password = read_secret(path)
                except ValueError as exc:
                    raise ValueError(f"controller_password_file: {exc}") from None
            self.controller = RspamdController(config.controller or DEFAULT_CONTROLLER, password, config.io_timeout)
        self.taught_counts: Path | None = None
        if config.backend == "spamd":
            taught = config.taught_counts
            self.taught_counts = (
                Path(os.path.expanduser(taught)) if taught else default_database().with_name("spamd-taught.json")
            )
        self.bayes: Bayes | None = None
        self.cpu_bound = config.backend == "builtin"  # the Bayes backend computes: a pool process
        if config.backend == "builtin":
            path = Path(os.path.expanduser(config.database)) if config.database else default_database()
            self.bayes = Bayes(path)
            if not path.exists():
                log.warning("spam: %s does not exist: only GTUBE is detected until pop3proxy train fills it", path)

    def learn(self, message: bytes, label: Literal["spam", "ham"], user: str = "") -> bool:
        """Teach the backend one message as spam or ham (the web console's "spam" / "not spam" buttons).

        True when it learnt the message now, False when it already knew it in that class. ``user``:
        the mailbox owner, told to spamd and rspamd as with checks. Raises `LearnError` (a
        ValueError) when the backend refuses or cannot be reached.
        """
        if label not in LABELS:
            raise ValueError(f"label must be spam or ham, not {label!r}")
        try:
            if self.spamd is not None:
                learnt = self.spamd.tell(message, label, user)
                if learnt:
                    self._count_taught(label)
                return learnt
            if self.controller is not None:
                return self.controller.learn(message, label, user)
        except (SpamdError, RspamdError) as exc:
            raise LearnError(str(exc)) from None
        assert self.bayes is not None
        return self.bayes.train_messages(**{label: [message]}).known[label] == 0

    def trained(self) -> tuple[int, int]:
        """(spam, ham) messages learnt: the built-in store's counts; rspamd's own, as its controller last
        counted them (it refreshes them from redis every 30 to 60 s); for spamd, the messages pop3proxy
        taught it (spamd does not say). Raises `LearnError` when they cannot be read."""
        if self.controller is not None:
            try:
                return self.controller.stat()
            except RspamdError as exc:
                raise LearnError(str(exc)) from None
        if self.taught_counts is not None:
            return self._read_taught()
        assert self.bayes is not None
        return self.bayes.counts()

    def _read_taught(self) -> tuple[int, int]:
        assert self.taught_counts is not None
        try:
            doc = json.loads(self.taught_counts.read_bytes())
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError) as exc:
            raise LearnError(f"cannot read the counts in {self.taught_counts}: {exc}") from None
        counts: list[Any] = [doc.get(label) if isinstance(doc, dict) else None for label in LABELS]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise LearnError(f"{self.taught_counts} does not hold spam and ham counts")
        return counts[0], counts[1]

    def _count_taught(self, label: str) -> None:
        """One more message taught to spamd; a count that cannot be kept is logged, not fatal (spamd
        did learn)."""
        assert self.taught_counts is not None
        with _TAUGHT_LOCK:
            try:
                spam, ham = self._read_taught()
                counts = {"spam": spam + (label == "spam"), "ham": ham + (label == "ham")}
                self.taught_counts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                replace_file(self.taught_counts, json.dumps(counts).encode() + b"\n")
            except (LearnError, OSError) as exc:
                log.warning("spam: spamd learnt a message as %s, but the count is not kept: %s", label, exc)

    def threshold(self, user: str) -> float:
        return self.config.per_user.get(user, self.config.required_score)

    def check(self, message: bytes, context: FilterContext) -> Report:
        """The backend's score for the message; raises when the backend fails."""
        if self.spamd is not None:
            reply = self.spamd.check(message, context.user)
            return Report(reply.score, reply.symbols)
        if self.rspamd is not None:
            answer = self.rspamd.check(message, context.user, context.uid)
            hint = answer.action in self.config.spam_actions
            return Report(answer.score, answer.symbols, hint, note=f"action {answer.action}")
        return self._builtin(message)

    def _builtin(self, message: bytes) -> Report:
        assert self.bayes is not None
        score, tests = 0.0, []
        try:  # the parts found once for both the GTUBE look and the tokens
            msg = parse(message)
        except Exception:
            msg = None
        if has_gtube(message, msg):
            score, tests = 1000.0, ["GTUBE"]
        result = self.bayes.classify(message, msg)
        note = ""
        if result.nspam >= self.config.min_trained and result.nham >= self.config.min_trained:
            score += round(20.0 * (result.probability - 0.5), 1)
            tests += bayes_rules(result.probability)
        else:
            note = f"Bayes not used: trained on {result.nspam} spam and {result.nham} ham"
        return Report(score, sorted(tests), note=note)

    def __call__(self, message: bytes, context: FilterContext) -> FilterOutcome:
        limit = self.config.max_size
        if limit and len(message) > limit:
            return FilterOutcome(message, verdict=f"not checked: {len(message)} octets > max_size {limit}")
        report = self.check(message, context)
        required = self.threshold(context.user)
        spam = report.score >= required or report.spam_hint
        tagged = add_headers(message, spam_headers(spam, report.score, required, report.tests))
        if spam and self.config.subject_prefix:
            tagged = prefix_subject(tagged, self.config.subject_prefix)
        verdict = f"{'spam' if spam else 'ham'}, score {format_score(report.score)}/{format_score(required)}"
        if report.note:
            verdict += f", {report.note}"
        action: Action = "quarantine" if spam and self.config.action == "quarantine" else "deliver"
        return FilterOutcome(tagged, verdict=verdict, action=action)


def read_secret(path: Path) -> str:
    """A password kept in a file that only its owner may read (first line, without the line end)."""
    try:
        if path.stat().st_mode & 0o077:
            raise ValueError(f"{path} is readable by others; chmod 600 it")
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not lines or not lines[0]:
        raise ValueError(f"{path} is empty")
    return lines[0]


_BAYES_BUCKETS = [
    (0.01, "BAYES_00"), (0.05, "BAYES_05"), (0.20, "BAYES_20"), (0.40, "BAYES_40"), (0.60, "BAYES_50"),
    (0.80, "BAYES_60"), (0.95, "BAYES_80"), (0.99, "BAYES_95"),
]


def bayes_rules(probability: float) -> list[str]:
    """SpamAssassin's names for the band the probability falls in (BAYES_00 ... BAYES_99, BAYES_999)."""
    for upper, rule in _BAYES_BUCKETS:
        if probability < upper:
            return [rule]
    return ["BAYES_99", "BAYES_999"] if probability >= 0.999 else ["BAYES_99"]


FILTER = SpamFilter
