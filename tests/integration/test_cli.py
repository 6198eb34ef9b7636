"""The command line and the configuration, as a user meets them."""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers.common import HOST, write_config

from pop3proxy import __version__
from pop3proxy.config import ConfigError, load_settings
from pop3proxy.proxy.credentials import read_users, verify_password


def run_cli(*args: str, env: dict | None = None, stdin: str | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pop3proxy {__version__}"


def test_missing_named_config_is_one_clear_line(tmp_path):
    result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"pop3proxy: config error: config file {tmp_path / 'nope.toml'} does not exist"


@pytest.mark.parametrize(
    "body, key",
    [
        ("[listen]\nport = 'abc'\n", "listen.port"),
        ("[listen]\nprot = 1\n", "listen.prot: unknown setting"),
        ("[upstream]\ndelete = 'sometimes'\n", "upstream.delete"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection: unknown setting"),
        ("[listen\n", "invalid TOML"),
        ("[cache]\nbackend = 'mh'\n", "cache.backend"),
    ],
)
def test_bad_config_names_the_key(tmp_path, body, key):
    path = tmp_path / "c.toml"
    path.write_text(body)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2, result.stdout
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_environment_overrides_file(tmp_path, monkeypatch):
    path = write_config(tmp_path / "c.toml", {"upstream": {"host": "pop.example.com", "delete": "never"}})
    monkeypatch.setenv("POP3PROXY_UPSTREAM__HOST", "pop.example.org")
    monkeypatch.setenv("POP3PROXY_LISTEN__PORT", "2110")
    settings = load_settings(path)
    assert settings.upstream.host == "pop.example.org"
    assert settings.upstream.delete == "never"
    assert settings.listen.port == 2110


def test_bad_environment_value_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POP3PROXY_LISTEN__IDLE_TIMEOUT", "-5")
    with pytest.raises(ConfigError, match="listen.idle_timeout"):
        load_settings(None)


def test_default_config_found_in_working_directory(tmp_path):
    write_config(tmp_path / "pop3proxy.toml", {"cache": {"backend": "mbox"}})
    result = run_cli("check-config", cwd=tmp_path, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert result.returncode == 0, result.stderr
    assert "pop3proxy.toml" in result.stdout.splitlines()[0]
    body = json.loads("\n".join(result.stdout.splitlines()[1:]))
    assert body["cache"]["backend"] == "mbox"


def test_check_config_masks_secrets(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[filters]]\nuse = "plugins.pipeline_filters:WithSecret"\npassword = "hunter2"\n')
    result = run_cli("check-config", "--config", str(path), env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert json.loads("\n".join(result.stdout.splitlines()[1:]))["filters"][0]["password"] == "***"


def test_adduser_writes_scrypt_hash_with_private_mode(tmp_path):
    users = tmp_path / "users"
    result = run_cli("adduser", "carol", "--users-file", str(users), "--password-stdin", stdin="pw one\n")
    assert result.returncode == 0, result.stderr
    stored = read_users(users)["carol"]
    assert stored.startswith("$scrypt$") and "pw one" not in users.read_text()
    assert verify_password("pw one", stored) and not verify_password("pw two", stored)
    assert users.stat().st_mode & 0o777 == 0o600
    result = run_cli("passwd", "carol", "--users-file", str(users), "--password-stdin", stdin="pw two\n")
    assert result.returncode == 0
    assert verify_password("pw two", read_users(users)["carol"])


def test_adduser_refuses_bad_names_and_empty_passwords(tmp_path):
    users = tmp_path / "users"
    result = run_cli("adduser", "bad:name", "--users-file", str(users), "--password-stdin", stdin="x\n")
    assert result.returncode == 1 and "invalid user name" in result.stderr
    result = run_cli("adduser", "ok", "--users-file", str(users), "--password-stdin", stdin="\n")
    assert result.returncode == 2 and "empty password" in result.stderr


def test_serve_with_nothing_to_serve_says_so(tmp_path):
    path = write_config(tmp_path / "c.toml", {"listen": {"port": 0}})
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 1
    assert "nothing to serve" in result.stderr and "Traceback" not in result.stderr


def test_demo_serves_sample_mail_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3proxy", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        lines = []
        timer = threading.Timer(20, proc.kill)
        timer.start()
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"port (\d+)", line)
            if match:
                port = int(match.group(1))
            if "Ctrl-C" in line:
                break
        timer.cancel()
        assert port, "".join(lines)
        text = "".join(lines)
        assert f"curl -s pop3://demo:demo@{HOST}:{port}/" in text
        assert "poplib" in text
        client = poplib.POP3(HOST, port, timeout=10)
        client.user("demo")
        client.pass_("demo")
        count, _ = client.stat()
        assert count == 4
        messages = [b"\r\n".join(client.retr(i)[1]) for i in (1, 2, 3, 4)]
        assert b"\r\nSubject: Welcome to pop3proxy\r\n" in messages[0]
        assert b"multipart/mixed" in messages[1] and b'filename="invoice.csv"' in messages[1]
        # the spam filter tagged the GTUBE message, and only that one
        assert b"GTUBE" in messages[2] and b"X-Spam-Flag: YES" in messages[2]
        assert not any(b"X-Spam-Flag: YES" in m for m in messages[:2] + messages[3:])
        # the attachment filter replaced the disguised program by a note
        assert b"label.pdf.exe" in messages[3] and b"This program cannot be run" not in messages[3]
        assert b"TVqQ" not in messages[3]  # the base64 of the program's first bytes
        client.quit()
        # the web console is served too, at the URL printed
        url = re.search(r"Web console: (http://\S+/)", text)
        assert url, text
        import urllib.request

        with urllib.request.urlopen(url.group(1), timeout=10) as reply:  # redirected to the sign-in page
            assert reply.url.endswith("/login") and "Sign in" in reply.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "stopped" in out
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_example_config_loads():
    example = Path(__file__).resolve().parents[2] / "deploy" / "pop3proxy.example.toml"
    settings = load_settings(example)
    assert settings.upstream.host == "pop.example.com"
    assert settings.routes["example.org"].host == "pop.example.org"
    assert settings.accounts["alice"].remote_user == "alice@example.com"


@pytest.mark.parametrize("which", ["listen", "metrics", "web"])
def test_a_busy_port_is_a_one_line_error_and_exit_2(tmp_path, which):
    import socket

    from pop3proxy.proxy.credentials import set_password

    users = tmp_path / "users"
    set_password(users, "alice", "pw")
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        sections = {"listen": {"host": HOST, "port": 0}, "local": {"users_file": users},
                    "cache": {"root": tmp_path / "cache"}}
        if which == "listen":
            sections["listen"]["port"] = port
        else:  # started inside the service's nursery, after the POP3 listeners
            sections[which] = {"host": HOST, "port": port}
        config = write_config(tmp_path / "busy.toml", sections)
        result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    assert "internal error" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pop3proxy: cannot listen") and str(port) in last and "in use" in last.lower(), last
