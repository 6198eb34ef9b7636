"""The house is kept in order: ``ruff`` and ``mypy`` find nothing in pop3proxy/ and filters/.

Both run as the configuration in pyproject.toml says (``[tool.ruff]``, ``[tool.mypy]``), from the
repository root, with this interpreter. A missing tool fails the test, naming it: install the ``test``
extra (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: it comes with the test extra (pip install -e '.[test]')")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "--no-cache", "pop3proxy", "filters")
    assert result.returncode == 0, f"ruff check pop3proxy filters:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing():
    # The files to check, the strictness and where pop3proxy.filters comes from are in [tool.mypy];
    # its cache (.mypy_cache/, not committed) keeps a second run short.
    result = run_tool("mypy")
    assert result.returncode == 0, f"mypy:\n{result.stdout}{result.stderr}"
