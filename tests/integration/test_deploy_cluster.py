"""deploy/cluster/: the compose example of a cluster (HAProxy, two nodes, PostgreSQL). Its parts are
checked with the real tools where they run here: HAProxy reads its configuration, pop3proxy its node's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.haproxy import find_haproxy

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "cluster"


def test_haproxy_accepts_the_example_configuration():
    done = subprocess.run([find_haproxy(), "-c", "-f", str(CLUSTER / "haproxy.cfg")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (CLUSTER / "haproxy.cfg").read_text()
    assert "send-proxy-v2" in text and "check-send-proxy" in text  # the nodes require the header


def test_the_node_configuration_loads_and_asks_for_the_proxy_protocol():
    done = subprocess.run([sys.executable, "-m", "pop3proxy", "check-config", "--config", str(CLUSTER / "node.toml")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert '"proxy_protocol": true' in done.stdout
    assert '"database": "postgresql://pop3proxy@postgres:5432/pop3proxy"' in done.stdout


def test_the_compose_file_names_every_part_and_runs_the_upgrade_first():
    text = (CLUSTER / "compose.yaml").read_text()
    for service in ("postgres:", "schema:", "dovecot:", "node1:", "node2:", "haproxy:"):
        assert f"\n  {service}" in text, service
    assert '"db", "upgrade"' in text and "service_completed_successfully" in text
    assert "127.0.0.1:1110:1110" in text  # only HAProxy is published, on loopback
