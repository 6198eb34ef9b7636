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
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pop3proxy.filtering import FilterContext, FilterOutcome, add_header, header_end
from pop3proxy.filters._bayes import Bayes, default_database, has_gtube, train_command
from pop3proxy.filters._net import parse_address
from pop3proxy.filters._rspamd import RspamdClient
from pop3proxy.filters._spamd import SpamdClient

log = logging.getLogger("pop3proxy.filters.spam")

MAX_STARS = 50
DEFAULT_ADDRESSES = {"spamd": "127.0.0.1:783", "rspamd": "http://127.0.0.1:11333"}


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

        @field_validator("subject_prefix")
        @classmethod
        def _printable_ascii(cls, value: str) -> str:
            if value and not (value.isascii() and value.isprintable() and value.strip()):
                raise ValueError("must be printable ASCII on one line, not only spaces")
            return value

        @model_validator(mode="after")
        def _backend_options(self) -> "SpamFilter.Config":
            if self.backend == "builtin" and self.address:
                raise ValueError("address is for the spamd and rspamd backends")
            if self.backend != "builtin" and self.database:
                raise ValueError("database is for the builtin backend")
            if self.backend == "spamd" and self.address:
                parse_address(self.address)
            if self.backend == "rspamd" and self.address:
                RspamdClient(self.address)
            return self

    def __init__(self, config: "SpamFilter.Config | None" = None) -> None:
        self.config = config = config or self.Config()
        address = config.address or DEFAULT_ADDRESSES.get(config.backend, "")
        self.spamd = SpamdClient(address, config.io_timeout) if config.backend == "spamd" else None
        self.rspamd = RspamdClient(address, config.io_timeout) if config.backend == "rspamd" else None
        self.bayes: Bayes | None = None
        if config.backend == "builtin":
            path = Path(os.path.expanduser(config.database)) if config.database else default_database()
            self.bayes = Bayes(path)
            if not path.exists():
                log.warning("spam: %s does not exist: only GTUBE is detected until pop3proxy train fills it", path)

    def learn(self, message: bytes, label: Literal["spam", "ham"]) -> None:
        """Teach the built-in classifier one message (the web console's "spam" / "not spam" buttons)."""
        if self.bayes is None:
            raise ValueError(f"the {self.config.backend} backend is trained with its own tools, not here")
        self.bayes.train_messages(**{label: [message]})

    def trained(self) -> tuple[int, int] | None:
        """(spam, ham) messages the built-in classifier has learnt; None for the spamd/rspamd backends."""
        return self.bayes.counts() if self.bayes is not None else None

    def threshold(self, user: str) -> float:
        return self.config.per_user.get(user, self.config.required_score)

    def check(self, message: bytes, context: FilterContext) -> Report:
        """The backend's score for the message; raises when the backend fails."""
        if self.spamd is not None:
            reply = self.spamd.check(message, context.user)
            return Report(reply.score, reply.symbols)
        if self.rspamd is not None:
            reply = self.rspamd.check(message, context.user, context.uid)
            hint = reply.action in self.config.spam_actions
            return Report(reply.score, reply.symbols, hint, note=f"action {reply.action}")
        return self._builtin(message)

    def _builtin(self, message: bytes) -> Report:
        assert self.bayes is not None
        score, tests = 0.0, []
        if has_gtube(message):
            score, tests = 1000.0, ["GTUBE"]
        result = self.bayes.classify(message)
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
        action = "quarantine" if spam and self.config.action == "quarantine" else "deliver"
        return FilterOutcome(tagged, verdict=verdict, action=action)


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
