"""One service per POP3 port: a second `pop3proxy serve` on a port a running one holds stops at once.

Worker processes share their ports with SO_REUSEPORT, which the kernel allows to any process of the
same user: without a check of its own, a second service (an old one not stopped, a manual `serve`
beside the systemd unit) would silently get half the connections, with a cache and throttle of its own.
"""

from __future__ import annotations

import os
import poplib
import queue
import socket
import subprocess
import sys
import threading

import pytest
from helpers.common import HOST, START_BOUND, children_of, write_config
from helpers.proxy import closed_port, sample
from test_workers import serving_worker

from pop3proxy.proxy.credentials import set_password


def run_until_ready_or_exit(config) -> tuple[int | None, list[str]]:
    """Run `pop3proxy serve` until it exits (its code and output) or says it listens (None and the
    output so far; the process is then stopped)."""
    proc = subprocess.Popen([sys.executable, "-m", "pop3proxy", "serve", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    output: list[str] = []
    try:
        while True:
            try:
                line = lines.get(timeout=START_BOUND)
            except queue.Empty:
                raise AssertionError("the second service neither started nor stopped:\n" + "\n".join(output))
            if line is None:
                return proc.wait(START_BOUND), output
            output.append(line)
            if "listening for POP3" in line:
                return None, output
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)


def proxy_config(path, dovecot, port: int, workers: int, cache):
    return write_config(path, {
        "listen": {"host": HOST, "port": port, "workers": workers},
        "upstream": {"host": HOST, "port": dovecot.port, "tls": "none", "timeout": 10},
        "cache": {"root": cache},
    })


def assert_refused_naming(code: int | None, output: list[str], port: int, pid: int) -> None:
    assert code is not None, "the service started on a port another process serves:\n" + "\n".join(output)
    assert code == 2, "\n".join(output)
    text = "\n".join(output)
    assert "Traceback" not in text and "ExceptionGroup" not in text, text
    errors = [line for line in output if line.startswith("pop3proxy:")]
    assert len(errors) == 1, text
    assert f"{HOST}:{port}" in errors[0] and "in use" in errors[0] and f"pid {pid}" in errors[0], errors[0]


@pytest.mark.dovecot
@pytest.mark.parametrize("first_workers, second_workers", [(2, 2), (2, 1), (1, 2)])
def test_a_second_service_on_a_served_port_stops_naming_the_first(tmp_path, server_process, dovecot,
                                                                   first_workers, second_workers):
    name, password = dovecot.new_user()
    dovecot.deliver(name, sample(1))
    port = closed_port()
    first = server_process(proxy_config(tmp_path / "first.toml", dovecot, port, first_workers,
                                        tmp_path / "first-cache")).start()
    assert first.port == port

    # another configuration (its own cache) on the same port
    code, output = run_until_ready_or_exit(proxy_config(tmp_path / "second.toml", dovecot, port, second_workers,
                                                        tmp_path / "second-cache"))
    assert_refused_naming(code, output, port, first.proc.pid)

    # the first service still answers every connection, with its own processes
    ours = set(children_of(first.proc.pid)) if first_workers > 1 else {first.proc.pid}
    for _ in range(8):
        client = poplib.POP3(HOST, port, timeout=30)
        if first_workers > 1:
            assert serving_worker(first, client) in ours
        client.user(name)
        assert client.pass_(password).startswith(b"+OK")
        assert client.stat()[0] == 1
        client.quit()
    assert not (tmp_path / "second-cache").exists() or not any((tmp_path / "second-cache").iterdir())


@pytest.mark.parametrize("reuseport", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_held_by_another_program_names_its_pid(tmp_path, workers, reuseport):
    # With SO_REUSEPORT (as an older pop3proxy's workers, or any program of this user might) the
    # kernel would let the workers join that program's port: the supervisor looks for listeners.
    users = tmp_path / "users"
    set_password(users, "alice", "pw")
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "busy.toml", {
            "listen": {"host": HOST, "port": port, "workers": workers},
            "local": {"users_file": users}, "cache": {"root": tmp_path / "cache"}})
        code, output = run_until_ready_or_exit(config)
    assert_refused_naming(code, output, port, os.getpid())
