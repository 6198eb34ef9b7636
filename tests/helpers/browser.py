"""A real headless Chromium (Debian's `chromium`, through Playwright) for the web console's tests:
the ``browser`` fixture (tests/conftest.py makes it available to every test)."""

from __future__ import annotations

import pytest
from helpers.common import require_tool

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=require_tool("chromium", "chromium"), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
