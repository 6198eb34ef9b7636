"""The package as a user installs it: one wheel, one fresh venv, the demo served from the install.

The wheel is built once and installed once (module-scoped fixtures): this is the slow test of the suite.
"""

from __future__ import annotations

import configparser
import os
import poplib
import queue
import re
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from helpers.common import HOST

ROOT = Path(__file__).resolve().parents[2]
BUILTIN_FILTERS = {
    "spam": "pop3proxy.filters.spam:SpamFilter",
    "attachments": "pop3proxy.filters.attachments:AttachmentsFilter",
    "clamav": "pop3proxy.filters.clamav:ClamAVFilter",
    "headers": "pop3proxy.filters.headers:HeadersFilter",
}
# pip's words when it cannot reach the package index (or a proxy in front of it).
NETWORK_TROUBLE = re.compile(
    r"(NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Network is unreachable"
    r"|Connection refused|ConnectTimeout|ReadTimeout|No matching distribution found|ProxyError|SSLError)"
)


def clean_env() -> dict[str, str]:
    """The environment without anything pointing Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def pip_or_fail(args: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            args, check=False, capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: pip did not finish in {timeout:.0f} s (is the package index reachable?)")
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if NETWORK_TROUBLE.search(output):
            pytest.fail(f"{what}: pip cannot reach the package index; this test needs it.\n{output[-3000:]}")
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{output[-3000:]}")
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip_or_fail(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        "building the wheel",
        timeout=300,
    )
    wheels = list(out.glob("pop3proxy-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv (no system site packages) with the wheel installed, its dependencies from the index."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(root)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    if made.returncode != 0:
        pytest.fail(f"python3 -m venv failed (apt-get install python3-venv; see .ci/install-deps.sh):\n{made.stderr}")
    pip_or_fail(
        [str(root / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        "installing the wheel in a fresh venv",
        timeout=600,
    )
    return root


def test_wheel_installs_filters_under_the_package_with_entry_points(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points_file = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(entry_points_file).decode()
    top_level = {name.split("/")[0] for name in names}
    assert "filters" not in top_level, sorted(top_level)
    assert top_level == {"pop3proxy", entry_points_file.split("/")[0]}, sorted(top_level)
    for module in ("__init__", "spam", "attachments", "clamav", "headers", "_bayes", "_mime"):
        assert f"pop3proxy/filters/{module}.py" in names, module
    for package in ("pop3", "store", "filtering", "net", "proxy", "submission", "ops", "admin"):
        assert f"pop3proxy/{package}/__init__.py" in names, package
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # entry point names are case-sensitive
    parser.read_string(entry_points)
    assert dict(parser["pop3proxy.filters"]) == BUILTIN_FILTERS
    assert parser["console_scripts"]["pop3proxy"] == "pop3proxy.cli:main"


def test_fresh_venv_imports_the_installed_package_only(venv: Path, tmp_path):
    python = str(venv / "bin" / "python")
    probe = (
        "import importlib.util, sys, pop3proxy, pop3proxy.filters.spam; "
        "print(pop3proxy.__file__); print(importlib.util.find_spec('filters')); "
        "print(int(sys.prefix != sys.base_prefix))"
    )
    result = subprocess.run(
        [python, "-c", probe], check=False, capture_output=True, text=True, timeout=60, env=clean_env(), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    location, filters_spec, in_venv = result.stdout.split("\n")[:3]
    assert Path(location).resolve().is_relative_to(venv.resolve()), location
    assert filters_spec == "None"  # no top-level "filters" package was installed
    assert in_venv == "1"


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_installed_demo_serves_sample_mail_with_its_filters(venv: Path, tmp_path):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    proc = subprocess.Popen(
        [str(venv / "bin" / "pop3proxy"), "demo", "--port", "0"],
        cwd=workdir,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
        seen = []
        port = None
        while True:
            try:
                line = lines.get(timeout=60)  # the demo's banner, the readiness signal
            except queue.Empty:
                pytest.fail("the installed demo printed no banner in 60 s:\n" + "".join(seen))
            if line is None:
                pytest.fail("the installed demo exited:\n" + "".join(seen) + proc.stderr.read())
            seen.append(line)
            match = re.search(r"listens on \S+ port (\d+)", line)
            if match:
                port = int(match.group(1))
            if "Ctrl-C" in line:
                break
        assert port, "".join(seen)
        client = poplib.POP3(HOST, port, timeout=30)
        client.user("demo")
        client.pass_("demo")
        assert client.stat()[0] == 4
        messages = [b"\r\n".join(client.retr(i)[1]) for i in (1, 2, 3, 4)]
        client.quit()
        assert b"\r\nSubject: Welcome to pop3proxy\r\n" in messages[0]
        # the spam filter (from the installed pop3proxy.filters) tagged the GTUBE sample, and only it
        assert b"GTUBE" in messages[2] and b"X-Spam-Flag: YES" in messages[2]
        assert b"X-Spam-" in messages[2].split(b"\r\n\r\n", 1)[0]
        assert not any(b"X-Spam-Flag: YES" in m for m in messages[:2] + messages[3:])
        # the attachments filter replaced the disguised program by a note
        assert b"label.pdf.exe" in messages[3] and b"This program cannot be run" not in messages[3]
        assert b"TVqQ" not in messages[3]  # the base64 of the program's first bytes
        assert list(workdir.iterdir()) == []  # the demo keeps its mailbox out of the working directory
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        err = proc.stderr.read()
        rest = []
        while (line := lines.get(timeout=30)) is not None:  # the reader ends at end of file
            rest.append(line)
        assert proc.returncode == 0, err
        assert "stopped" in "".join(rest) and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
