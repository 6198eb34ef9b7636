"""The ``[cluster]`` section and the PROXY protocol settings: defaults, and a clear error for each bad value."""

from __future__ import annotations

import pytest

from pop3proxy.config import load_settings
from pop3proxy.errors import ConfigError


def test_without_a_cluster_section_a_node_is_one_machine():
    settings = load_settings(None, upstream={"host": "pop.example.net"})
    assert settings.cluster is None
    assert settings.listen.proxy_protocol is False


def test_a_cluster_section_has_sane_defaults():
    settings = load_settings(None, upstream={"host": "pop.example.net"},
                             cluster={"database": "postgresql://pop3proxy@db.example:5432/pop3proxy"})
    assert settings.cluster is not None
    assert settings.cluster.node  # the host name
    assert settings.cluster.pool_size == 10
    assert settings.cluster.drain_timeout == 30.0


def test_a_password_in_the_url_is_refused_and_never_echoed():
    with pytest.raises(ConfigError) as caught:
        load_settings(None, cluster={"database": "postgresql://pop3proxy:hunter2secret@db/pop3proxy"})
    assert "database_password_file" in str(caught.value)
    assert "hunter2secret" not in str(caught.value)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "db.example:5432", ""])
def test_a_database_that_is_not_postgresql_is_refused(url):
    with pytest.raises(ConfigError, match="cluster.database: .*postgresql://"):
        load_settings(None, cluster={"database": url})


def test_mbox_cannot_be_shared_by_a_cluster():
    with pytest.raises(ConfigError, match="mbox.*cannot be shared"):
        load_settings(None, cache={"backend": "mbox"}, cluster={"database": "postgresql://u@h/db"})


@pytest.mark.parametrize("name", ["a/b", "", "x" * 65, "node one"])
def test_a_node_name_is_a_plain_word(name):
    with pytest.raises(ConfigError, match="cluster.node"):
        load_settings(None, cluster={"database": "postgresql://u@h/db", "node": name})


def test_trusted_proxies_must_be_networks():
    with pytest.raises(ConfigError, match="listen.trusted_proxies: .*'10.0.0.0/33'"):
        load_settings(None, listen={"proxy_protocol": True, "trusted_proxies": ["10.0.0.0/33"]})
    settings = load_settings(None, listen={"proxy_protocol": True, "trusted_proxies": ["10.0.0.0/8", "::1"]})
    assert settings.listen.trusted_proxies == ["10.0.0.0/8", "::1"]
