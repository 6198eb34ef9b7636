"""Property tests for the attachments filter: random MIME trees and random damage, checking that the
filter never loses or garbles mail; and a real mail reader (mutt) reading a stripped message.
"""

from __future__ import annotations

import base64
import binascii
import mailbox
import os
import pty
import select
import subprocess
import time
import urllib.parse

from helpers.attachments import b64, leaves, parse, run, sample, shape
from helpers.common import require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.api import FilterOutcome
from pop3proxy.filters import _mime


# -- properties ------------------------------------------------------------------------------------

LEAF_NAMES = [
    None, "report.pdf", "photo.png", "notes.txt", "Übersicht-ß.docx",
    "invoice.pdf.exe", "run.JS", "setup.exe. ", "macro.xlsm", "ä€.bat",
]
DANGEROUS_NAMES = {"invoice.pdf.exe", "run.JS", "setup.exe. ", "macro.xlsm", "ä€.bat"}
LEAF_TYPES = [
    "text/plain", "text/html", "application/pdf", "application/octet-stream", "image/png", "application/x-msdownload"
]
DANGEROUS_TYPES = {"application/x-msdownload"}
TEXT = st.text(alphabet="abcdefghij KLMNOP.,!?äöü€\n", max_size=120)

leaf_strategy = st.tuples(
    st.just("leaf"),
    st.sampled_from(LEAF_TYPES),
    st.sampled_from(LEAF_NAMES),
    st.sampled_from(["quoted", "rfc2231", "rfc2047", "type-name"]),
    st.sampled_from(["7bit", "base64", "quoted-printable"]),
    TEXT,
    st.binary(max_size=120),
)


def tree_strategy():
    return st.recursive(
        leaf_strategy,
        lambda children: st.one_of(
            st.tuples(
                st.just("multipart"),
                st.sampled_from(["mixed", "alternative", "related"]),
                st.lists(children, min_size=1, max_size=3),
                st.booleans(),
            ),
            st.tuples(st.just("message"), children),
        ),
        max_leaves=6,
    )


class Renderer:
    """Turns a generated tree into message bytes; records, leaf by leaf, whether it must be stripped."""

    def __init__(self, eol: bytes) -> None:
        self.eol = eol
        self.count = 0
        self.dangerous: list[bool] = []

    def name_params(self, name: str, form: str) -> tuple[bytes, bytes]:
        """(Content-Type parameters, Content-Disposition) for a file name."""
        encoded_word = "=?UTF-8?B?" + base64.b64encode(name.encode()).decode() + "?="
        quoted = name if name.isascii() else encoded_word
        if form == "type-name":
            return f'; name="{quoted}"'.encode(), b"Content-Disposition: attachment"
        if form == "rfc2047":
            return b"", f'Content-Disposition: attachment; filename="{encoded_word}"'.encode()
        if form == "rfc2231":
            percent = urllib.parse.quote(name, safe="")
            return b"", ("Content-Disposition: attachment; filename*=UTF-8''" + percent).encode()
        return b"", f'Content-Disposition: attachment; filename="{quoted}"'.encode()

    def leaf(self, node) -> bytes:
        _, ctype, name, form, cte, text, data = node
        self.dangerous.append(ctype in DANGEROUS_TYPES or name in DANGEROUS_NAMES)
        params, disposition = self.name_params(name, form) if name else (b"", b"")
        charset = b"; charset=utf-8" if ctype.startswith("text/") else b""
        headers = [f"Content-Type: {ctype}".encode() + charset + params]
        if disposition:
            headers.append(disposition)
        if cte == "base64":
            body = b64(b"\x00data" + data, self.eol).rstrip(self.eol)
        elif cte == "quoted-printable":
            body = binascii.b2a_qp(text.encode(), istext=True).replace(b"\n", self.eol)
        else:
            body = text.encode("ascii", "replace").replace(b"\n", self.eol)
        headers.append(f"Content-Transfer-Encoding: {cte}".encode())
        return self.eol.join(headers) + self.eol + self.eol + body

    def entity(self, node) -> bytes:
        eol = self.eol
        if node[0] == "leaf":
            return self.leaf(node)
        if node[0] == "message":
            return b"Content-Type: message/rfc822" + eol + eol + b"Subject: inner" + eol + self.entity(node[1])
        _, subtype, children, extras = node
        self.count += 1
        boundary = f"=_b{self.count}_{subtype}".encode()
        out = f'Content-Type: multipart/{subtype}; boundary="{boundary.decode()}"'.encode() + eol + eol
        if extras:
            out += b"preamble text" + eol
        for child in children:
            out += b"--" + boundary + eol + self.entity(child) + eol
        out += b"--" + boundary + b"--"
        if extras:
            out += eol + b"epilogue text" + eol
        return out

    def message(self, tree) -> bytes:
        eol = self.eol
        head = [b"From: a@example.org", b"To: b@example.net", b"Subject: random", b"MIME-Version: 1.0"]
        return eol.join(head) + eol + self.entity(tree)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=tree_strategy(), crlf=st.booleans())
def test_random_mime_trees(tree, crlf, tmp_path_factory):
    renderer = Renderer(b"\r\n" if crlf else b"\n")
    message = renderer.message(tree)
    outcome = run(message, tmp_path_factory.mktemp("q"))
    original, result = parse(message), parse(outcome.data)
    before, after = leaves(original), leaves(result)
    assert len(before) == len(renderer.dangerous) == len(after)
    if not any(renderer.dangerous):
        assert outcome.data is message and outcome.verdict == ""
        return
    assert outcome.verdict.startswith(f"stripped {sum(renderer.dangerous)} part")
    if not crlf:
        assert b"\r" not in outcome.data
    expected_types = iter(["text/plain" if d else p.get_content_type() for p, d in zip(before, renderer.dangerous)])

    def expected_shape(message):
        if message.is_multipart():
            return (message.get_content_type(), tuple(expected_shape(p) for p in message.get_payload()))
        return next(expected_types)

    assert shape(result) == expected_shape(original)
    for old, new, dangerous in zip(before, after, renderer.dangerous):
        if dangerous:
            assert "removed from this message" in new.get_content() and new.defects == []
        else:
            assert new.items() == old.items()
            assert new.get_payload(decode=True) == old.get_payload(decode=True)
            assert [type(d) for d in new.defects] == [type(d) for d in old.defects]


TOKENS = [
    b"\r\n", b"\n", b"\r", b"--=_outer_6f1c2e", b"--=_outer_6f1c2e--", b"Content-Type: multipart/mixed; boundary=x\r\n",
    b"--x\r\n", b"Content-Type: message/rfc822\r\n\r\n", b"filename*0*=UTF-8''a%2E; filename*1*=exe", b"=?UTF-8?B?",
    b"\x00", b"\xff", b";", b'"', b":",
]
EDITS = st.lists(
    st.tuples(st.floats(0, 1), st.integers(0, 20), st.one_of(st.sampled_from(TOKENS), st.binary(max_size=6))),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(edits=EDITS)
def test_damaged_messages_never_crash_the_filter(edits):
    data = bytearray(sample("dkim-exe.eml"))
    for where, cut, insert in edits:
        position = int(where * len(data))
        data[position : position + cut] = insert
    message = bytes(data)
    try:
        outcome = run(message)
    except _mime.MimeError:
        return  # an ambiguous structure is refused, and the pipeline delivers it unchanged with a warning
    assert isinstance(outcome, FilterOutcome) and outcome.action == "deliver"
    if not outcome.verdict:
        assert outcome.data is message


# -- a real mail reader ----------------------------------------------------------------------------


def test_mutt_reads_a_stripped_message(tmp_path):
    mutt = require_tool("mutt", "mutt")
    outcome = run(sample("dkim-exe.eml"), tmp_path / "q")
    box = mailbox.mbox(tmp_path / "mbox")
    box.add(outcome.data)
    box.close()
    (tmp_path / "muttrc").write_text(f"set folder={tmp_path}\nset pipe_decode=yes\nset wait_key=no\n")
    env = dict(os.environ, HOME=str(tmp_path), TERM="vt100", LC_ALL="C.UTF-8", MAIL=str(tmp_path / "mbox"))
    out = tmp_path / "shown.txt"
    command = [mutt, "-n", "-F", str(tmp_path / "muttrc"), "-R", "-f", str(tmp_path / "mbox"),
               "-e", f'push "<pipe-message>cat >{out}<enter>"']
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=tmp_path)
    os.close(terminal)
    try:
        deadline, quit_sent = time.monotonic() + 20, False
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    os.read(controller, 65536)
                except OSError:
                    break
            elif out.exists() and not quit_sent:
                os.write(controller, b"q")  # back in the index after the pipe: quit
                quit_sent = True
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    shown = out.read_text("utf-8")
    assert "Grüße aus Köln" in shown  # the 8-bit text part, decoded
    assert "An attachment was removed from this message by pop3proxy." in shown
    assert "File name:     Rechnung-2025-1127.pdf.exe" in shown and "Rule:          extension exe" in shown
    assert "This program cannot be run" not in shown
