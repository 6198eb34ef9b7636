"""A short password is never masked where it occurs by chance: "Authentication ***ed" would show it.

Long secrets are masked wherever they appear; short ones are not looked for in free text, and the
provider's answer to a login with a short password is not shown at all (decided by the length, so
nothing tells whether the answer contained it). The provider is a scripted one: it is the fault
(its words happen to contain the password).
"""

from __future__ import annotations

import io
import logging

import pytest
from helpers.common import HOST
from helpers.faulty_upstream import faulty_server

from pop3proxy.config import LogSettings
from pop3proxy.net.endpoint import Endpoint, UpstreamAuthError
from pop3proxy.net.pop3_client import connect
from pop3proxy.ops.logs import MIN_MASKED, add_secrets, redact, setup_logging

PROVIDER_TEXT = "Authentication failed: invalid login"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_a_short_configured_secret_is_not_masked_inside_ordinary_words(restore_logging):
    buffer = io.StringIO()
    setup_logging(LogSettings(level="info", format="text"), stream=buffer)
    add_secrets(["fail", "long-configured-secret"])
    log = logging.getLogger("pop3proxy.test")
    log.info("provider said: %s", PROVIDER_TEXT)
    log.info("a long one: long-configured-secret here")
    first, second = buffer.getvalue().splitlines()
    assert first.endswith(f"provider said: {PROVIDER_TEXT}")  # as if no secret were configured
    assert "long-configured-secret" not in second and second.endswith("a long one: *** here")
    assert redact(f"x {PROVIDER_TEXT}") == f"x {PROVIDER_TEXT}"


@pytest.mark.parametrize("password", ["fail", "ail", "invalid"])
async def test_the_providers_answer_to_a_short_password_is_not_shown(password):
    assert len(password) < MIN_MASKED
    async with faulty_server(auth_error_text=PROVIDER_TEXT) as server:
        async with await connect(Endpoint(HOST, server.port, "none", timeout=5)) as client:
            with pytest.raises(UpstreamAuthError) as caught:
                await client.login("alice", password)
    text = str(caught.value)
    assert "***" not in text and PROVIDER_TEXT not in text and password not in text
    assert caught.value.code == "AUTH"


async def test_the_providers_answer_to_a_long_password_is_shown_masked():
    password = "a long password"
    async with faulty_server(auth_error_text="no such password: {password}") as server:
        async with await connect(Endpoint(HOST, server.port, "none", timeout=5)) as client:
            with pytest.raises(UpstreamAuthError) as caught:
                await client.login("alice", password)
    assert "no such password: ***" in str(caught.value) and password not in str(caught.value)
