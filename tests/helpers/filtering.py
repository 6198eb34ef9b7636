"""Shared by the filter pipeline's tests (tests/unit/test_filtering.py, test_headers_filter.py,
test_filter_command.py): the sample mail, a pipeline from filter tables, the plugins' state reset
around each test (an autouse fixture: import it), a DKIM verifier, running the command line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from plugins import pipeline_filters

from pop3proxy.filtering.api import FilterContext
from pop3proxy.filtering.pipeline import Pipeline, build_pipeline


TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
MAIL = TESTS / "data" / "mail"
NEWSLETTER = MAIL / "dkim-newsletter-tracking.eml"
MIXED = MAIL / "dkim-mixed-endings-8bit.eml"
LUNCH = MAIL / "plain-lunch.eml"
DKIM_KEY = (MAIL / "dkim-test-key.pub.pem").read_bytes()
CTX = FilterContext(user="alice", uid="0001")
P = "plugins.pipeline_filters"


@pytest.fixture(autouse=True)
def _reset_plugins():
    pipeline_filters.Tag.calls.clear()
    pipeline_filters.Sleepy.threads.clear()
    pipeline_filters.release_sleepers.clear()
    yield
    pipeline_filters.release_sleepers.set()  # lets abandoned slow filters finish


def pipeline(*tables: dict, concurrency: int = 2) -> Pipeline:
    return build_pipeline(list(tables), concurrency=concurrency)


# -- a DKIM verifier (rsa-sha256, relaxed/relaxed), enough to show signatures survive filtering ----


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _dkim_split(data: bytes) -> tuple[list[bytes], bytes]:
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[: end + 2], data[end + 4 :])
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body


def _relaxed_header(field: bytes) -> bytes:
    name, _, value = field.partition(b":")
    value = re.sub(rb"\r\n(?=[ \t])", b"", value)
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def dkim_verifies(message: bytes) -> bool:
    fields, body = _dkim_split(_crlf(message))
    sigs = [f for f in fields if f.partition(b":")[0].strip().lower() == b"dkim-signature"]
    assert len(sigs) == 1, "the samples carry one signature"
    tags = {}
    for part in sigs[0].partition(b":")[2].split(b";"):
        key, _, value = part.partition(b"=")
        tags[key.strip().decode()] = re.sub(rb"\s+", b"", value)
    if base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()) != tags["bh"]:
        return False
    used: set[int] = set()
    signed = b""
    for name in tags["h"].split(b":"):
        for i in range(len(fields) - 1, -1, -1):
            if i not in used and fields[i].partition(b":")[0].strip(b" \t").lower() == name.lower():
                used.add(i)
                signed += _relaxed_header(fields[i]) + b"\r\n"
                break
    signed += _relaxed_header(re.sub(rb"(\bb=)[^;]*", rb"\1", sigs[0]))
    key = serialization.load_pem_public_key(DKIM_KEY)
    try:
        key.verify(base64.b64decode(tags["b"]), signed, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True

def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", *args], capture_output=True, text=True, timeout=timeout, env=env
    )

HEADERS_OPTIONS = {"use": "headers", "remove": ["X-Tracking-*", "X-Mailgun-*"], "add": {"X-Filtered-By": "pop3proxy"}}
