"""The files in deploy/: the example configuration, the systemd unit, the container files.

No container engine runs here, so the container files are checked for what can be checked without
one: they parse, and every file they name exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from helpers.common import require_tool

from pop3proxy.config import Settings
from pop3proxy.filtering.loader import load_filter

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "pop3proxy.example.toml"
UNIT = DEPLOY / "pop3proxy.service"


def check_config(path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "pop3proxy", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout.split("\n", 1)[1])


# --- the example configuration ------------------------------------------------------------------


def test_example_config_loads_with_check_config():
    effective = check_config(EXAMPLE)
    assert effective["upstream"]["host"] == "pop.example.com"
    assert effective["routes"]["example.org"]["smtp_host"] == "smtp.example.org"
    assert effective["smtp"]["upstream"]["tls"] == "starttls"
    assert effective["metrics"]["host"] == "127.0.0.1"
    assert effective["throttle"]["max_failures"] == 5


def _section_text(text: str, header: str) -> str:
    """The lines of one [section] of the example (commented lines included), up to the next header."""
    start = re.search(rf"^#?\s*\[{re.escape(header)}\][^\n]*$", text, re.MULTILINE)
    assert start, f"[{header}] is missing from the example"
    rest = text[start.end():]
    end = re.search(r"^\[", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_example_config_documents_every_key():
    text = EXAMPLE.read_text()
    documented = lambda section, key: re.search(rf"^#?\s*{key}\s*=", section, re.MULTILINE)  # noqa: E731
    for name, field in Settings.model_fields.items():
        if name == "filters":
            assert "[[filters]]" in text
            continue
        model = field.annotation
        if name == "cluster":  # optional: ClusterSettings | None
            model = model.__args__[0]
        if name in ("routes", "accounts"):
            model = model.__args__[1]
            header = {"routes": "routes", "accounts": 'accounts."alice"'}[name]
            section = _section_text(text, header)
            for key in model.model_fields:
                if name == "routes":
                    assert re.search(rf"\b{key}\s*=", section), f"routes: {key} is not shown"
                else:
                    assert documented(section, key), f"accounts: {key} is not documented"
            continue
        section = _section_text(text, name)
        for key, sub in model.model_fields.items():
            if key == "upstream" and name == "smtp":
                section_up = _section_text(text, "smtp.upstream")
                for up_key in sub.annotation.model_fields:
                    assert documented(section_up, up_key), f"smtp.upstream.{up_key} is not documented"
                continue
            assert documented(section, key), f"{name}.{key} is not documented in {EXAMPLE.name}"


def test_example_filter_tables_are_valid():
    text = EXAMPLE.read_text()
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.strip() == "# [[filters]]":
            blocks.append([])
        elif blocks and line.startswith("# ") and "=" in line:
            blocks[-1].append(line[2:])
    assert len(blocks) >= 2
    for index, lines in enumerate(blocks):
        table = tomllib.loads("\n".join(lines))
        load_filter(table, index)  # raises, naming the filter, if the example went stale


def test_compose_config_loads():
    effective = check_config(DEPLOY / "compose.toml")
    assert effective["upstream"]["host"] == "dovecot"


# --- the systemd unit ---------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}:{number}: not a key=value line: {raw!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def test_unit_file_is_hardened():
    unit = parse_unit(UNIT)
    service = unit["Service"]
    values: dict[str, list[str]] = {}
    for key, value in service:
        values.setdefault(key, []).append(value)
    one = {key: vals[-1] for key, vals in values.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"  # ready once the workers accept
    assert one["User"] == "pop3proxy" and one["Group"] == "pop3proxy"
    assert one["ExecStart"] == "/usr/local/bin/pop3proxy serve --config /etc/pop3proxy/config.toml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["ProtectSystem"] == "strict"
    assert one["ReadWritePaths"].split() == ["/var/lib/pop3proxy"]
    assert one["StateDirectory"] == "pop3proxy"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices", "RestrictNamespaces",
                "RestrictSUIDSGID", "LockPersonality", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups"):
        assert one[key] == "yes", key
    assert sorted(one["RestrictAddressFamilies"].split()) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""  # no capability at all
    assert one["UMask"] == "0077"
    text = UNIT.read_text()
    assert re.search(r"^#\s+AmbientCapabilities=CAP_NET_BIND_SERVICE$", text, re.MULTILINE)
    comment = text[: text.index("AmbientCapabilities=CAP_NET_BIND_SERVICE")].rsplit("\n\n", 1)[-1]
    assert "Ports below 1024" in comment  # the capability only for privileged ports
    assert ("WantedBy", "multi-user.target") in unit["Install"]


def test_unit_file_passes_systemd_analyze(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    # `verify` checks that ExecStart's program exists: point it at a stand-in, keep everything else.
    program = tmp_path / "pop3proxy"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    unit = tmp_path / "pop3proxy.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/pop3proxy", str(program)))
    verify = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if "pop3proxy.service" in line]
    assert complaints == []  # no unknown keys, no bad values (systemd only warns about those)
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr  # exposure 2.0 or better
    assert re.search(r"Overall exposure level for pop3proxy\.service: [0-1]\.\d OK", security.stdout)


# --- the container files ------------------------------------------------------------------------


def load_compose() -> dict:
    text = (DEPLOY / "compose.yaml").read_text()
    try:
        import yaml
    except ImportError:  # a minimal reading: the keys this test looks at
        return _minimal_compose(text)
    return yaml.safe_load(text)


def _minimal_compose(text: str) -> dict:
    services: dict[str, dict] = {}
    current: dict | None = None
    key = None
    in_services = False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if indent == 0:
            in_services = stripped == "services:"
            continue
        if not in_services:
            continue
        if indent == 2 and stripped.endswith(":"):
            current = services.setdefault(stripped[:-1], {})
        elif indent == 4 and current is not None:
            key, _, value = stripped.partition(":")
            current[key] = value.strip() or ([] if key in ("volumes", "ports", "expose") else {})
        elif indent >= 6 and current is not None and key is not None:
            if stripped.startswith("- ") and isinstance(current[key], list):
                current[key].append(stripped[2:].strip('"'))
            elif isinstance(current[key], dict):
                k, _, v = stripped.partition(":")
                current[key][k] = v.strip()
    return {"services": services}


def test_compose_file_parses_and_its_files_exist():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"dovecot", "pop3proxy"}
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose.yaml mounts {source}, which does not exist"
    build = services["pop3proxy"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    for port in services["pop3proxy"]["ports"]:
        assert port.startswith("127.0.0.1:"), f"{port}: publish on the host's loopback only"
    config = tomllib.loads((DEPLOY / "compose.toml").read_text())
    assert config["upstream"]["host"] == "dovecot" and str(config["upstream"]["port"]) in services["dovecot"]["expose"]
    published = {int(p.split(":")[2]) for p in services["pop3proxy"]["ports"]}
    assert published == {config["listen"]["port"], config["metrics"]["port"]}


def test_containerfile_builds_from_existing_files_as_a_non_root_user():
    text = (DEPLOY / "Containerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0].startswith("FROM ") and "python:3.11-slim" in instructions[0]
    for line in instructions:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Containerfile copies {source}, which does not exist"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "pip install '.[cluster]'" in text
    exposed = {int(p) for line in instructions if line.startswith("EXPOSE ") for p in line.split()[1:]}
    config = tomllib.loads((DEPLOY / "compose.toml").read_text())
    assert {config["listen"]["port"], config["metrics"]["port"]} <= exposed
    assert json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.MULTILINE).group(1)) == ["pop3proxy"]
    assert json.loads(re.search(r"^CMD (.*)$", text, re.MULTILINE).group(1))[0] == "serve"


def test_sample_dovecot_is_valid_and_matches_the_sandbox(tmp_path):
    doveconf = require_tool("doveconf", "dovecot-core")
    conf = (DEPLOY / "dovecot" / "dovecot.conf").read_text()
    conf = conf.replace("/etc/dovecot/users", str(DEPLOY / "dovecot" / "users"))
    (tmp_path / "dovecot.conf").write_text(conf)
    result = subprocess.run([doveconf, "-n", "-c", str(tmp_path / "dovecot.conf")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^protocols = pop3$", result.stdout, re.MULTILINE)
    users = (DEPLOY / "dovecot" / "users").read_text()
    assert users.startswith("demo:{PLAIN}demo-password")
    assert "demo:demo-password@127.0.0.1:1110" in (DEPLOY / "compose.yaml").read_text()
    messages = sorted((DEPLOY / "dovecot" / "mail" / "demo" / "Maildir" / "new").iterdir())
    assert len(messages) == 2
    for message in messages:
        data = message.read_bytes()
        assert b"\r\n\r\n" in data and b"Subject: " in data and data.endswith(b"\r\n")
