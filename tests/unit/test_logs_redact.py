"""redact()'s shortcuts (text without a keyword skips the patterns; secrets are looked for longest first
from a list kept by add_secrets) mask exactly what running every pattern and every secret does."""

from __future__ import annotations

import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy.ops import logs
from pop3proxy.ops.logs import MASK, RedactingFilter, add_secrets, redact

SECRETS = ["zq\u017fecret-one", "zq-long-secret-two", "zq-three"]


def reference(text: str) -> str:
    """What redact() did before its shortcuts: every pattern, then every secret, longest first."""
    for pattern, replacement in logs._PATTERNS:
        text = pattern.sub(replacement, text)
    for secret in sorted(logs._secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def test_keywords_outside_ascii_still_reach_the_patterns() -> None:
    # re's case-insensitive matching takes the long s for an s and the Kelvin sign for a k: the shortcut too.
    assert redact("pa\u017fsword=hunter22") == "pa\u017fsword=***"
    assert redact("PA\u017fSWD: 'hunter22'") == "PA\u017fSWD: '***'"
    assert redact("\u00e9 auth plain AGJvYgBwdw==") == "\u00e9 auth plain ***"
    assert redact("\u00e9 Apop bob " + "ab" * 16) == "\u00e9 Apop bob ***"


def test_a_secret_added_later_is_masked_and_a_text_as_short_as_a_secret_is_checked() -> None:
    assert redact("late-secret-0001 x") == "late-secret-0001 x"
    add_secrets(["late-secret-0001"])
    assert redact("late-secret-0001 x") == "*** x"
    assert redact("late-secret-0001") == MASK
    assert redact("no keyword here, late-secret-0001") == "no keyword here, ***"


WORDS = ["pass", "PASS ", "Pass\t", "pa\u017fs", "password=", "passwd: '", "auth ", "AUTH PLAIN ", "apop bob ",
         "APOP x " + "0123456789abcdef" * 2, "AGJvYgBwdw==", "zq-three", "zq-long-secret-two", "zq\u017fecret-", "one", "-", " ", "\r\n",
         "\u00e9", "\u212a", "'", '"', "=", ":", ",", "}", "word"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=12), st.text(max_size=6))
def test_redact_masks_what_every_pattern_and_secret_would(words: list[str], noise: str) -> None:
    add_secrets(SECRETS)
    text = "".join(words) + noise
    assert redact(text) == reference(text)


def test_the_filter_masks_fields_and_arguments() -> None:
    add_secrets(["configured-field-secret"])
    record = logging.LogRecord("pop3proxy", logging.INFO, "f", 1, "login %r said %s", ("bob", "PASS hunter2"), None)
    record.user, record.peer, record.note = "bob", "127.0.0.1", "x configured-field-secret"
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "login 'bob' said PASS ***"
    assert (record.user, record.peer, record.note) == ("bob", "127.0.0.1", "x ***")
