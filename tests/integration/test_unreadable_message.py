"""A message the cache cannot read is answered -ERR [SYS/TEMP], never +OK and an empty body.

A client that got `+OK` with an empty body would store an empty message and DELE it, and under the
`mirror` policy the provider's copy would go too. Real server process, real client (poplib).
"""

from __future__ import annotations

import poplib
import shutil

import pytest
from helpers.common import HOST, write_config

from pop3proxy.proxy.credentials import set_password
from pop3proxy.store import open_store
from pop3proxy.store.paths import user_dir

MESSAGES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\nsecond\r\n", b"Subject: three\r\n\r\nthird\r\n"]


@pytest.fixture
def server(tmp_path, server_process):
    users = tmp_path / "users"
    set_password(users, "alice", "pw")
    root = tmp_path / "cache"
    with open_store(root, "alice", "maildir") as mailbox:
        for message in MESSAGES:
            mailbox.add(message)
    config = write_config(
        tmp_path / "pop3proxy.toml",
        {"listen": {"host": HOST, "port": 0}, "local": {"users_file": users}, "cache": {"root": root}},
    )
    proc = server_process(config).start()
    proc.maildir = user_dir(root, "alice") / "Maildir"
    return proc


def message_files(maildir):
    return sorted((p for sub in ("cur", "new") for p in (maildir / sub).iterdir()), key=lambda p: p.name)


@pytest.mark.parametrize("command", ["RETR", "TOP"])
@pytest.mark.parametrize("damage", ["removed by hand", "unreadable"])
def test_unreadable_message_is_a_temporary_error_and_the_session_goes_on(server, command, damage):
    client = poplib.POP3(HOST, server.port, timeout=10)
    client.user("alice")
    client.pass_("pw")
    assert client.stat()[0] == 3
    victim = message_files(server.maildir)[1]
    victim.unlink()
    if damage == "unreadable":
        victim.mkdir()  # open() now fails with an OSError (EISDIR), as it would for EIO
    with pytest.raises(poplib.error_proto) as info:
        client.retr(2) if command == "RETR" else client.top(2, 0)
    assert info.value.args[0].startswith(b"-ERR [SYS/TEMP]")
    # The session goes on: the other messages are served whole, nothing was marked deleted.
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGES[0]
    assert b"\r\n".join(client.retr(3)[1]) + b"\r\n" == MESSAGES[2]
    assert client.stat()[0] == 3
    client.quit()
    if damage == "unreadable":
        shutil.rmtree(victim)
