"""The SMTP submission relay end to end: real clients (smtplib, swaks) → pop3proxy's relay → a real
SMTP provider (aiosmtpd with AUTH and TLS, see smtp_fixtures.py).

Most tests run the relay in-process (``nursery.start(run_smtp, ...)``); the crash test runs a real
``pop3proxy serve`` process and kills it with SIGKILL.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import ssl
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from helpers.common import HOST, require_tool
from helpers.smtp_fixtures import (  # noqa: F401  (fixtures)
    BOB,
    PROVIDER_PASSWORD,
    PROVIDER_USER,
    SENDER,
    Client,
    message,
    provider,
    provider_tls,
    relay_config,
    running_relay,
    submit,
)
from helpers.waiting import eventually, eventually_async, wait_for

from pop3proxy.config import load_settings, queue_dir
from pop3proxy.store import open_store
from pop3proxy.submission.queue import OutQueue
from pop3proxy.submission.queue_cli import queue_command


def queued(settings) -> list:
    directory = queue_dir(settings)
    return OutQueue(directory).entries() if directory.exists() else []


def cached_messages(settings, user: str = PROVIDER_USER) -> list[bytes]:
    with open_store(settings.cache.root, user, settings.cache.backend) as mailbox:
        out = []
        for info in mailbox.list():
            with mailbox.open(info.key) as f:
                out.append(f.read())
        return out


def delivered_from_queue(queue_id: str) -> re.Pattern[str]:
    """The relay's log line that a queued entry was delivered: the attempt is over and the entry gone."""
    return re.compile(rf"queued mail {re.escape(queue_id)} of .* delivered")


def log_shows(caplog, pattern: re.Pattern[str]):
    return lambda: pattern.search(caplog.text)


# --- relaying ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_relays_byte_exact_over_starttls(tmp_path, provider, server_cert, caplog, mechanism):
    caplog.set_level(logging.DEBUG)
    settings = load_settings(relay_config(tmp_path, provider, server_cert))
    data = message(f"byte exact {mechanism}")
    async with running_relay(settings) as port:
        auth, reply = await trio.to_thread.run_sync(
            partial(submit, port, server_cert[2], data, mechanism=mechanism, recipients=(BOB, "carol@example.org"))
        )
    assert auth[0] == 235
    assert reply[0] == 250 and b"sent to the mail provider" in reply[1]
    [got] = provider.received()
    assert got.data == data  # every byte as the client sent it
    assert got.sender == SENDER
    assert got.recipients == (BOB, "carol@example.org")
    assert got.login == PROVIDER_USER  # pass-through: the client's own credentials
    # checked at the provider at AUTH time, then one login for the message
    assert provider.auth_attempts == [("PLAIN", True), ("PLAIN", True)]
    assert queued(settings) == []
    assert f"smtp login {PROVIDER_USER!r} from 127.0.0.1" in caplog.text and "relayed mail of" in caplog.text
    assert PROVIDER_PASSWORD not in caplog.text
    assert base64.b64encode(f"\0{PROVIDER_USER}\0{PROVIDER_PASSWORD}".encode()).decode() not in caplog.text
    assert "caf\xe9" not in caplog.text and "two dots" not in caplog.text  # no message body in the log


async def test_implicit_tls_provider(tmp_path, provider_tls, server_cert):
    settings = load_settings(relay_config(tmp_path, provider_tls, server_cert))
    assert settings.smtp.upstream.tls == "implicit"
    data = message("over implicit tls")
    async with running_relay(settings) as port:
        auth, reply = await trio.to_thread.run_sync(partial(submit, port, server_cert[2], data, mechanism="LOGIN"))
    assert auth[0] == 235 and reply[0] == 250
    assert [m.data for m in provider_tls.received()] == [data]


async def test_wrong_password_is_535_and_nothing_is_relayed(tmp_path, provider, server_cert, caplog):
    caplog.set_level(logging.DEBUG)
    settings = load_settings(relay_config(tmp_path, provider, server_cert))
    async with running_relay(settings) as port:

        def attempt():
            client = Client(port, server_cert[2])
            try:
                auth = client.auth(password="wrong password")
                mail = client.smtp.mail(SENDER)  # not authenticated: refused
                return auth, mail
            finally:
                client.close()

        auth, mail = await trio.to_thread.run_sync(attempt)
    assert auth[0] == 535
    assert mail[0] == 530
    assert provider.received() == []
    assert provider.auth_attempts == [("PLAIN", False)]  # checked at the provider, at AUTH time
    assert not (Path(settings.cache.root) / PROVIDER_USER).exists()  # nothing remembered
    assert "wrong password" not in caplog.text


async def test_swaks_sends_through_the_relay(tmp_path, provider, server_cert):
    swaks = require_tool("swaks", "swaks")
    support = subprocess.run([swaks, "--support"], capture_output=True, text=True, timeout=60)
    if "=== TLS supported" not in support.stdout + support.stderr:
        pytest.fail("swaks cannot do TLS: apt-get install libnet-ssleay-perl libio-socket-ssl-perl")
    settings = load_settings(relay_config(tmp_path, provider, server_cert))
    async with running_relay(settings) as port:
        results = []
        for mechanism, tls in (("PLAIN", ["--tls"]), ("LOGIN", [])):  # STARTTLS; plaintext from loopback
            result = await trio.run_process(
                [swaks, "--server", HOST, "--port", str(port), *tls, "--auth", mechanism,
                 "--auth-user", PROVIDER_USER, "--auth-password", PROVIDER_PASSWORD,
                 "--from", SENDER, "--to", BOB, "--helo", "client.test",
                 "--header", f"Subject: swaks {mechanism}", "--body", "hello from swaks"],
                capture_stdout=True, capture_stderr=True, check=False,
            )
            results.append(result)
    for result in results:
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    got = provider.received()
    assert [m.recipients for m in got] == [(BOB,), (BOB,)]
    assert b"Subject: swaks PLAIN\r\n" in got[0].data and b"Subject: swaks LOGIN\r\n" in got[1].data
    assert all(b"hello from swaks" in m.data for m in got)


async def test_plaintext_auth_follows_listen_policy(tmp_path, provider, server_cert):
    settings = load_settings(relay_config(tmp_path, provider, server_cert, listen={"allow_plaintext_auth": "never"}))
    blob = base64.b64encode(f"\0{PROVIDER_USER}\0{PROVIDER_PASSWORD}".encode()).decode()
    async with running_relay(settings) as port:

        def attempt():
            client = Client(port, starttls=False)
            try:
                offered = client.smtp.has_extn("auth")
                plain = client.smtp.docmd("AUTH", "PLAIN " + blob)
                client.smtp.starttls(context=ssl.create_default_context(cafile=str(server_cert[2])))
                client.smtp.ehlo()
                return offered, plain, client.smtp.has_extn("auth"), client.smtp.docmd("AUTH", "PLAIN " + blob)
            finally:
                client.close()

        offered, plain, offered_tls, after_tls = await trio.to_thread.run_sync(attempt)
    assert not offered and plain[0] == 538  # refused before TLS, without asking the provider
    assert offered_tls and after_tls[0] == 235
    assert provider.auth_attempts == [("PLAIN", True)]


async def test_provider_replies_reach_the_client(tmp_path, provider, server_cert):
    provider.reject.add("nobody@example.net")
    provider.defer.add("busy@example.net")
    settings = load_settings(relay_config(tmp_path, provider, server_cert))
    async with running_relay(settings) as port:
        send = partial(submit, port, server_cert[2])
        _, refused = await trio.to_thread.run_sync(partial(send, message("refused"), recipients=["nobody@example.net"]))
        _, deferred = await trio.to_thread.run_sync(partial(send, message("deferred"), recipients=["busy@example.net"]))
        _, partly = await trio.to_thread.run_sync(
            partial(send, message("partly"), recipients=[BOB, "nobody@example.net"])
        )
    assert refused[0] == 550 and b"5.1.1" in refused[1] and b"no such user" in refused[1]
    assert deferred[0] == 450 and b"4.2.1" in deferred[1]
    assert partly[0] == 250 and b"did not take 1 of 2" in partly[1] and b"report is in your mailbox" in partly[1]
    [got] = provider.received()
    assert got.recipients == (BOB,) and b"Subject: partly" in got.data
    assert queued(settings) == []  # "the provider said no" is never queued
    [report] = cached_messages(settings)  # the refused recipient is reported in the sender's mailbox
    assert b"Content-Type: multipart/report; report-type=delivery-status" in report
    assert b"Final-Recipient: rfc822; nobody@example.net" in report
    assert b"Status: 5.1.1" in report
    assert b"Subject: partly" in report and b"8-bit text" not in report  # headers only


async def test_oversized_message_is_refused(tmp_path, provider, server_cert):
    settings = load_settings(relay_config(tmp_path, provider, server_cert, smtp={"max_message_size": 2048}))
    async with running_relay(settings) as port:
        _, reply = await trio.to_thread.run_sync(
            partial(submit, port, server_cert[2], message("big", (b"x" * 70 + b"\r\n") * 40))
        )
    assert reply[0] == 552
    assert provider.received() == []


# --- the provider away -----------------------------------------------------------------------------


async def test_unreachable_without_password_source_is_451_and_not_queued(tmp_path, provider, server_cert):
    settings = load_settings(relay_config(tmp_path, provider, server_cert))
    async with running_relay(settings) as port:
        client = await trio.to_thread.run_sync(partial(Client, port, server_cert[2]))
        try:
            auth = await trio.to_thread.run_sync(client.auth)
            await trio.to_thread.run_sync(provider.stop)
            reply = await trio.to_thread.run_sync(client.send, message("not queued"))
        finally:
            await trio.to_thread.run_sync(client.close)
        # AUTH while the provider is away and no password source or offline hash exists: 454
        auth_down, _ = await trio.to_thread.run_sync(partial(submit, port, server_cert[2], message("x")))
    assert auth[0] == 235
    assert reply[0] == 451 and b"4.4.1" in reply[1] and b"NOT queued" in reply[1]
    assert auth_down[0] == 454
    assert queued(settings) == []
    assert provider.received() == []


async def test_unreachable_provider_checks_the_offline_hash_but_cannot_queue(tmp_path, provider, server_cert):
    from pop3proxy.proxy.offline import OFFLINE_HASH
    from pop3proxy.proxy.credentials import hash_password
    from pop3proxy.store.paths import user_dir
    from pop3proxy.store.state import UserState

    settings = load_settings(relay_config(tmp_path, provider, server_cert))
    directory = user_dir(settings.cache.root, PROVIDER_USER)
    directory.mkdir(parents=True)
    with UserState(directory / "state.db") as state:  # what POP3 offline mode remembered
        state.set_meta(OFFLINE_HASH, hash_password(PROVIDER_PASSWORD))
    provider.stop()
    async with running_relay(settings) as port:
        send = partial(submit, port, server_cert[2], message("offline"))
        auth, reply = await trio.to_thread.run_sync(send)
        wrong, _ = await trio.to_thread.run_sync(partial(send, password="not it"))
    assert auth[0] == 235 and b"cannot be reached" in auth[1]
    assert reply[0] == 451 and b"NOT queued" in reply[1]
    assert wrong[0] == 535
    assert queued(settings) == []


async def test_a_certificate_failure_never_checks_the_offline_hash(tmp_path, provider, server_cert):
    from pop3proxy.proxy.offline import OFFLINE_HASH
    from pop3proxy.proxy.credentials import hash_password
    from pop3proxy.store.paths import user_dir
    from pop3proxy.store.state import UserState

    settings = load_settings(
        relay_config(tmp_path, provider, server_cert, upstream={"ca_file": ""}, pop3={"ca_file": ""})
    )
    directory = user_dir(settings.cache.root, PROVIDER_USER)
    directory.mkdir(parents=True)
    with UserState(directory / "state.db") as state:  # what POP3 offline mode remembered
        state.set_meta(OFFLINE_HASH, hash_password(PROVIDER_PASSWORD))
    async with running_relay(settings) as port:
        send = partial(submit, port, server_cert[2], message("in the middle"))
        auth, _ = await trio.to_thread.run_sync(send)
    assert auth[0] == 454  # not accepted offline: the peer could not prove to be the provider
    assert provider.received() == [] and provider.auth_attempts == []


async def test_unreachable_with_password_source_queues_then_delivers_once(tmp_path, provider, server_cert, caplog):
    caplog.set_level(logging.DEBUG)
    settings = load_settings(relay_config(tmp_path, provider, server_cert, password_source=True))
    provider.stop()
    data = message("store and forward")
    async with running_relay(settings) as port:
        auth, reply = await trio.to_thread.run_sync(partial(submit, port, server_cert[2], data))
        assert auth[0] == 235  # checked against the password source while the provider is away
        assert reply[0] == 250 and b"Queued as" in reply[1]
        queue_id = re.search(rb"Queued as (\S+):", reply[1]).group(1).decode()
        [entry] = queued(settings)
        assert entry.id == queue_id and entry.recipients == [BOB] and entry.sender == SENDER
        assert OutQueue(queue_dir(settings)).read_message(queue_id) == data
        await eventually_async(lambda: queued(settings) and queued(settings)[0].attempts >= 1)
        assert provider.received() == []
        await trio.to_thread.run_sync(provider.start)
        await eventually_async(lambda: provider.received() and not queued(settings))  # delivered and dequeued
        # No duplicate can follow once the attempt that delivered is over: it removed the entry, and
        # the queue holds nothing else to send. The relay logs that moment.
        await eventually_async(log_shows(caplog, delivered_from_queue(queue_id)))
    assert [m.data for m in provider.received()] == [data]
    assert provider.received()[0].sender == SENDER and provider.received()[0].recipients == (BOB,)
    assert queued(settings) == []
    assert cached_messages(settings) == []  # no bounce
    assert PROVIDER_PASSWORD not in caplog.text


async def test_provider_certificate_is_verified(tmp_path, provider, server_cert):
    # The system trust store does not know the test CA: the provider's certificate must be refused,
    # and a refused certificate counts as "unreachable" (queued, never sent in the clear or unverified).
    settings = load_settings(
        relay_config(tmp_path, provider, server_cert, password_source=True, upstream={"ca_file": ""},
                     pop3={"ca_file": ""})
    )
    async with running_relay(settings) as port:
        auth, reply = await trio.to_thread.run_sync(partial(submit, port, server_cert[2], message("unverified")))
        await eventually_async(lambda: queued(settings) and queued(settings)[0].attempts >= 1)
    assert auth[0] == 235 and reply[0] == 250 and b"Queued as" in reply[1]
    assert "certificate verification failed" in queued(settings)[0].last_error
    assert provider.received() == [] and provider.auth_attempts == []  # the password never left


async def test_give_up_bounces_into_the_senders_cached_mailbox(tmp_path, provider, server_cert):
    settings = load_settings(
        relay_config(tmp_path, provider, server_cert, password_source=True, smtp={"give_up_after": 1.0})
    )
    provider.stop()
    data = message("never delivered")
    async with running_relay(settings) as port:
        _, reply = await trio.to_thread.run_sync(partial(submit, port, server_cert[2], data))
        assert reply[0] == 250 and b"Queued as" in reply[1]
        # the bounce is stored first, then the entry removed: never a moment without either
        await eventually_async(lambda: cached_messages(settings) and not queued(settings), timeout=15)
    [report] = cached_messages(settings)
    assert b"Subject: Undelivered Mail Returned to Sender\r\n" in report
    assert b"To: <alice@example.com>\r\n" in report
    assert b"Content-Type: multipart/report; report-type=delivery-status" in report
    assert b"Final-Recipient: rfc822; bob@example.net" in report
    assert b"Action: failed" in report and b"Status: 4.4.7" in report
    assert b"Subject: never delivered" in report  # the original's headers, not its body
    assert b"two dots" not in report
    assert provider.received() == []


async def test_half_written_queue_entry_is_never_sent(tmp_path, provider, server_cert, caplog):
    caplog.set_level(logging.INFO)
    settings = load_settings(relay_config(tmp_path, provider, server_cert, password_source=True))
    queue = OutQueue(queue_dir(settings))
    entry = queue.add(login=PROVIDER_USER, cache_id=PROVIDER_USER, sender=SENDER, recipients=[BOB],
                      data=message("complete"))
    # A crash while writing leaves the entry in tmp/ only: it must never be sent.
    crashed = queue.tmp / "20200101000000-0badc0de"
    crashed.mkdir()
    (crashed / "message").write_bytes(message("half written"))
    old = time.time() - 2 * 86400
    os.utime(crashed, (old, old))
    async with running_relay(settings):
        await eventually_async(lambda: provider.received() and not queue.entries())  # delivered and dequeued
        # The half-written entry was swept before the first pass, which is over once the complete
        # entry's delivery is logged: nothing is left that could send it.
        await eventually_async(log_shows(caplog, delivered_from_queue(entry.id)))
    assert [m.data for m in provider.received()] == [message("complete")]
    assert queue.entries() == [] and queue.get(entry.id) is None
    assert not crashed.exists()  # swept at start


def test_queue_command_lists_deletes_and_flushes(tmp_path, provider, server_cert, capsys):
    settings = load_settings(relay_config(tmp_path, provider, server_cert, password_source=True))
    queue = OutQueue(queue_dir(settings))
    keep = queue.add(login=PROVIDER_USER, cache_id=PROVIDER_USER, sender=SENDER, recipients=[BOB],
                     data=message("keep me"))
    drop = queue.add(login=PROVIDER_USER, cache_id=PROVIDER_USER, sender=SENDER, recipients=["x@example.net"],
                     data=message("drop me"))
    out = io.StringIO()
    assert queue_command(settings, "list", [], out=out) == 0
    listing = out.getvalue()
    assert keep.id in listing and drop.id in listing and SENDER in listing and "x@example.net" in listing

    out = io.StringIO()
    assert queue_command(settings, "delete", [drop.id], out=out) == 0
    assert f"{drop.id}: deleted" in out.getvalue()
    assert queue_command(settings, "delete", [drop.id], out=io.StringIO()) == 1  # gone now
    assert queue_command(settings, "delete", [], out=io.StringIO()) == 2  # never "delete everything"
    assert queue_command(settings, "delete", ["../../etc"], out=io.StringIO()) == 2

    provider.stop()
    out = io.StringIO()
    assert queue_command(settings, "flush", [], out=out) == 1  # still queued
    assert "still queued" in out.getvalue()
    [entry] = queue.entries()
    assert entry.attempts == 1 and entry.last_error

    provider.start()
    out = io.StringIO()
    assert queue_command(settings, "flush", [], out=out) == 0
    assert f"{keep.id}: delivered" in out.getvalue()
    assert [m.data for m in provider.received()] == [message("keep me")]
    out = io.StringIO()
    assert queue_command(settings, "list", [], out=out) == 0
    assert "empty" in out.getvalue()


async def test_deferred_recipients_are_queued_when_a_password_source_exists(tmp_path, provider, server_cert):
    provider.defer.add("busy@example.net")
    settings = load_settings(relay_config(tmp_path, provider, server_cert, password_source=True))
    data = message("one now, one later")
    async with running_relay(settings) as port:
        _, reply = await trio.to_thread.run_sync(
            partial(submit, port, server_cert[2], data, recipients=[BOB, "busy@example.net"])
        )
        assert reply[0] == 250 and b"1 queued for another try" in reply[1] and b"report" not in reply[1]
        await eventually_async(lambda: queued(settings) and queued(settings)[0].attempts >= 1)
        provider.defer.clear()
        await eventually_async(lambda: len(provider.received()) == 2 and not queued(settings))
    assert [(m.recipients, m.data) for m in provider.received()] == [((BOB,), data), (("busy@example.net",), data)]
    assert cached_messages(settings) == []  # nothing to report: everybody got it


def test_queued_mail_partly_refused_is_sent_once_per_recipient(tmp_path, provider, server_cert):
    provider.reject.add("nobody@example.net")
    provider.defer.add("busy@example.net")
    settings = load_settings(relay_config(tmp_path, provider, server_cert, password_source=True))
    queue = OutQueue(queue_dir(settings))
    data = message("three recipients")
    entry = queue.add(login=PROVIDER_USER, cache_id=PROVIDER_USER, sender=SENDER,
                      recipients=[BOB, "busy@example.net", "nobody@example.net"], data=data)

    assert queue_command(settings, "flush", [], out=io.StringIO()) == 1  # busy@ is still to do
    [left] = queue.entries()
    assert left.recipients == ["busy@example.net"] and left.attempts == 1 and "4.2.1" in left.last_error
    [report] = cached_messages(settings)  # the permanent refusal is reported at once
    assert b"Final-Recipient: rfc822; nobody@example.net" in report and b"busy@example.net" not in report

    assert queue_command(settings, "flush", [], out=io.StringIO()) == 1  # still deferred
    provider.defer.clear()
    assert queue_command(settings, "flush", [entry.id], out=io.StringIO()) == 0
    assert [(m.recipients, m.data) for m in provider.received()] == [((BOB,), data), (("busy@example.net",), data)]
    assert queue.entries() == []
    assert len(cached_messages(settings)) == 1


# --- a real process, killed -------------------------------------------------------------------------

_SMTP_READY = re.compile(r"listening for SMTP on \S+ port (\d+)")


def test_kill_9_after_queueing_then_restart_delivers_exactly_once(tmp_path, provider, server_cert, server_process):
    config = relay_config(tmp_path, provider, server_cert, password_source=True)
    settings = load_settings(config)
    provider.stop()
    data = message("survives kill -9")

    def smtp_port(process) -> int:
        return int(wait_for(process, _SMTP_READY, timeout=15).group(1))

    first = server_process(config).start()
    auth, reply = submit(smtp_port(first), server_cert[2], data)
    assert auth[0] == 235 and reply[0] == 250 and b"Queued as" in reply[1]
    first.kill()  # SIGKILL: no clean shutdown
    [entry] = queued(settings)
    assert entry.recipients == [BOB]

    provider.start()
    second = server_process(config).start()
    smtp_port(second)
    eventually(lambda: provider.received() and not queued(settings), timeout=20)  # delivered and dequeued
    # No duplicate can follow once the attempt that delivered is over and logged (nothing is queued any more).
    wait_for(second, delivered_from_queue(entry.id), timeout=20)
    second.stop()
    assert [m.data for m in provider.received()] == [data]
    assert queued(settings) == []
    assert "delivered" in second.output()
    assert PROVIDER_PASSWORD not in first.output() + second.output()
