"""Logging: JSON lines that parse, structured fields on the lines that matter, and never a credential."""

from __future__ import annotations

import base64
import io
import json
import logging
import poplib
from functools import partial

import pytest
import trio
from helpers.common import HOST, write_config
from helpers.smtp_fixtures import (  # noqa: F401  (fixtures)
    PROVIDER_PASSWORD,
    PROVIDER_USER,
    message,
    provider,
    relay_config,
    running_relay,
    submit,
)

from pop3proxy.config import LogSettings, load_settings
from pop3proxy.ops.logs import add_secrets, redact, setup_logging
from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store

PASSWORD = "correct horse battery"
WRONG = "wrong staple guess"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("mail.log").level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("mail.log").setLevel(saved[2])


def json_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(json.loads(line))  # every line is one JSON object
    return records


def test_standalone_serve_logs_json_with_fields_and_no_password(tmp_path, server_process):
    users = tmp_path / "users"
    set_password(users, "alice", PASSWORD)
    root = tmp_path / "cache"
    with open_store(root, "alice") as mailbox:
        mailbox.add(b"Subject: one\r\n\r\nbody one\r\n")
        mailbox.add(b"Subject: two\r\n\r\nbody two\r\n")
    config = write_config(
        tmp_path / "pop3proxy.toml",
        {
            "listen": {"host": HOST, "port": 0},
            "local": {"users_file": users},
            "cache": {"root": root},
            "log": {"level": "debug", "format": "json"},
        },
    )
    server = server_process(config).start()
    bad = poplib.POP3(HOST, server.port, timeout=30)
    bad.user("alice")
    with pytest.raises(poplib.error_proto):
        bad.pass_(WRONG)
    bad.quit()
    client = poplib.POP3(HOST, server.port, timeout=30)
    client.user("alice")
    client.pass_(PASSWORD)
    served = b"\r\n".join(client.retr(2)[1]) + b"\r\n"
    client.quit()
    server.stop()
    output = server.output()
    records = json_lines(output)

    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert record["time"].endswith("Z") and record["level"] in ("debug", "info", "warning", "error")
    assert PASSWORD not in output and WRONG not in output
    assert "Traceback" not in output

    [failed] = [r for r in records if r["message"].startswith("login failed")]
    assert failed["user"] == "alice" and failed["peer"] == "127.0.0.1" and failed["result"] == "failed"
    [login] = [r for r in records if r["message"].startswith("login 'alice'")]
    assert login["user"] == "alice" and login["peer"] == "127.0.0.1" and login["messages"] == 2
    assert login["result"] == "ok" and "upstream" in login  # None in standalone mode
    ends = [r for r in records if r["message"].startswith("session end")]
    end = [r for r in ends if r.get("messages") == 1]
    assert len(end) == 1, ends
    end = end[0]
    assert end["user"] == "alice" and end["peer"] == "127.0.0.1" and "upstream" in end
    assert end["bytes"] >= len(served) and isinstance(end["duration"], float)
    assert any(r["message"].startswith("listening for POP3") for r in records)


async def test_smtp_relay_logs_carry_user_peer_upstream_and_no_credentials(
    tmp_path, provider, server_cert, restore_logging
):
    buffer = io.StringIO()
    setup_logging(LogSettings(level="debug", format="json"), stream=buffer)
    settings = load_settings(relay_config(tmp_path, provider, server_cert))
    async with running_relay(settings) as port:
        await trio.to_thread.run_sync(partial(submit, port, server_cert[2], message("logged"), mechanism="PLAIN"))
        await trio.to_thread.run_sync(
            partial(submit, port, server_cert[2], message("x"), mechanism="LOGIN", password=WRONG)
        )
    text = buffer.getvalue()
    records = json_lines(text)
    assert PROVIDER_PASSWORD not in text and WRONG not in text
    for secret in (PROVIDER_PASSWORD, WRONG):
        assert base64.b64encode(secret.encode()).decode() not in text
        assert base64.b64encode(f"\0{PROVIDER_USER}\0{secret}".encode()).decode() not in text
    assert b"two dots".decode() not in text  # no message body, not even at debug level
    where = f"{HOST}:{provider.port}"
    logins = [r for r in records if r.get("protocol") == "smtp" and r["message"].startswith("smtp login")]
    assert {(r["result"], r["user"], r["peer"], r["upstream"]) for r in logins} == {
        ("ok", PROVIDER_USER, HOST, where),
        ("failed", PROVIDER_USER, HOST, where),
    }
    [relayed] = [r for r in records if r.get("result") == "relayed"]
    assert relayed["user"] == PROVIDER_USER and relayed["upstream"] == where
    assert relayed["bytes"] == len(message("logged")) and relayed["recipients"] == 1
    assert isinstance(relayed["duration"], float)
    assert any(r["message"].startswith("listening for SMTP on") for r in records)


def test_exceptions_are_one_line_and_credentials_are_masked(restore_logging):
    buffer = io.StringIO()
    setup_logging(LogSettings(level="info", format="text"), stream=buffer)
    add_secrets(["configured-secret-42"])
    log = logging.getLogger("pop3proxy.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    log.info("client said %s", "PASS hunter2 hunter3")
    log.info("client said AUTH PLAIN %s", base64.b64encode(b"\0bob\0pw").decode())
    log.warning("the password is configured-secret-42 here")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4  # one line each, no traceback
    assert "Traceback" not in buffer.getvalue()
    assert lines[0].endswith("it failed (ValueError: boom)")
    assert lines[1].endswith("client said PASS ***")
    assert lines[2].endswith("client said AUTH PLAIN ***")
    assert "configured-secret-42" not in lines[3] and "***" in lines[3]


def test_json_format_puts_extra_fields_and_errors_in_the_object(restore_logging):
    buffer = io.StringIO()
    setup_logging(LogSettings(level="info", format="json"), stream=buffer)
    log = logging.getLogger("pop3proxy.test")
    log.info("session end", extra={"user": "alice", "peer": "127.0.0.1", "messages": 3, "bytes": 512,
                                   "duration": 0.25, "note": "PASS secret words"})
    try:
        raise OSError("disk full")
    except OSError:
        log.error("cannot write", exc_info=True)
    first, second = json_lines(buffer.getvalue())
    assert first["message"] == "session end" and first["logger"] == "pop3proxy.test" and first["level"] == "info"
    assert (first["user"], first["peer"], first["messages"], first["bytes"], first["duration"]) == (
        "alice", "127.0.0.1", 3, 512, 0.25,
    )
    assert first["note"] == "PASS ***"
    assert second["error"] == "OSError: disk full" and second["level"] == "error"


def test_redact_leaves_ordinary_text_alone():
    text = "pass-through login of alice@example.com from 127.0.0.1: 3 messages"
    assert redact(text) == text
