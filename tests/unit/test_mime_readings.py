"""The MIME scanner reads a part's headers a second time with the ``default`` policy only where the
two policies could disagree; where it skips that, they must agree on everything the filters use."""

from __future__ import annotations

from email import policy
from email.parser import BytesHeaderParser

from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy.filters import _mime

TOKEN = st.text("abcXYZ019-._+/=*'\"; \\é()?", min_size=1, max_size=12)
VALUE = st.one_of(TOKEN, TOKEN.map(lambda t: f'"{t}"'))
PARAM = st.tuples(st.sampled_from(["boundary", "name", "filename", "charset", "Boundary", "filename*"]), VALUE)
HEADER = st.tuples(
    st.sampled_from(["multipart/mixed", "text/plain", "application/octet-stream", "attachment", "inline"]),
    st.lists(PARAM, max_size=4),
).map(lambda t: t[0] + "".join(f"; {k}={v}" for k, v in t[1]))


def readings(message) -> tuple:
    return (message.get_content_type(), message.get_boundary(), message.get_filename(), message.get_param("name"))


@settings(max_examples=3000, deadline=None)
@given(HEADER, HEADER)
def test_where_the_second_reading_is_skipped_both_policies_agree(content_type, disposition):
    block = f"Content-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
    compat = BytesHeaderParser(policy=policy.compat32).parsebytes(block)
    if not _mime._plainly_alike(compat):
        return
    default = BytesHeaderParser(policy=policy.default).parsebytes(block)
    assert readings(compat) == readings(default), block


def test_ordinary_headers_are_read_once_and_unusual_ones_twice():
    parse = BytesHeaderParser(policy=policy.compat32).parsebytes
    assert _mime._plainly_alike(parse(b'Content-Type: multipart/mixed; boundary="b1 x"\r\n\r\n'))
    assert _mime._plainly_alike(parse(b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n'))
    for unusual in (b'Content-Type: multipart/mixed; boundary="a"; boundary="b"\r\n\r\n',
                    b"Content-Disposition: attachment; filename*=utf-8''a.exe\r\n\r\n",
                    b'Content-Disposition: attachment; filename="=?utf-8?q?a.exe?="\r\n\r\n',
                    b'Content-Type: text/plain\r\nContent-Type: text/html\r\n\r\n',
                    b'Content-Disposition: attachment; filename="a\\"b.exe"\r\n\r\n'):
        assert not _mime._plainly_alike(parse(unusual)), unusual
