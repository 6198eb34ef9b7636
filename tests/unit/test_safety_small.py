"""Small safety rules: secret files are 0600 whatever the umask, only ASCII digits are numbers."""

from __future__ import annotations

import os
import stat

import pytest

from pop3proxy.config import Settings
from pop3proxy.errors import LoginError
from pop3proxy.proxy.auth_cache import AUTH_CACHE_FILE
from pop3proxy.proxy.routing import resolve


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_the_auth_cache_entry_is_0600_whatever_the_umask(tmp_path, umask, mask):
    from pop3proxy.proxy.backend import ProxyBackend

    settings = Settings(listen={"port": 0}, upstream={"host": "127.0.0.1", "tls": "none"},
                        cache={"root": tmp_path / "cache"}, sync={"auth_cache_ttl": 60})
    backend = ProxyBackend(settings)
    route = resolve("alice", settings)
    umask(mask)
    backend.auth_cache.remember(route.cache_id, "the password")
    backend.auth_cache.remember(route.cache_id, "the password")  # replacing an entry keeps the mode too
    entry = backend.auth_cache.path(route.cache_id)
    assert entry.name == AUTH_CACHE_FILE
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert backend.auth_cache.matches(route.cache_id, "the password")
    assert [p.name for p in entry.parent.iterdir() if p.name.startswith(AUTH_CACHE_FILE)] == [AUTH_CACHE_FILE]


@pytest.mark.parametrize("port", ["²", "９９５", "٩٩٥", "99５", "+995", " 995", "995 ", "-1"])
def test_a_port_in_a_login_name_is_ascii_digits_only(port):
    settings = Settings(upstream={"host": "127.0.0.1", "port": 995, "tls": "implicit"})
    with pytest.raises(LoginError) as caught:
        resolve(f"x#127.0.0.1:{port}", settings)
    assert caught.value.code == "AUTH"
    assert resolve("x#127.0.0.1:995", settings).remote_user == "x"  # the ASCII spelling works
