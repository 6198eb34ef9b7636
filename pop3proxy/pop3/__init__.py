"""Sans-IO POP3: bytes in, events and actions out; nothing here does I/O.

The server side turns received octets into `Line` events (`LineReader`) and lines into
`Command`s (`parse_command`), formats replies (`ok`, `err`, `multiline`, `continuation`,
`DotStuffer`) and runs the RFC 1939 state machine (`session.Session`). The client side turns a
provider's octets into `Status` / `Data` / `EndOfData` events (`ReplyReader`,
`ClientConnection`). RFC 1939 (POP3), 2449 (CAPA, response codes), 5034 (SASL).
Standard library only (import-linter keeps trio, os, socket and ssl out).
"""

from pop3proxy.pop3.client import (
    ClientConnection,
    apop_digest,
    parse_capa,
    parse_greeting_timestamp,
    parse_scan_listing,
    parse_uidl_listing,
)
from pop3proxy.pop3.commands import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    Command,
    parse_command,
    parse_number,
)
from pop3proxy.pop3.dotstuff import DotStuffer, to_crlf, wire_size
from pop3proxy.pop3.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pop3proxy.pop3.framing import (
    MAX_REPLY_LINE,
    NEED_DATA,
    Data,
    EndOfData,
    Event,
    Line,
    LineReader,
    LineTooLong,
    NeedData,
    ReplyReader,
    Status,
)
from pop3proxy.pop3.replies import continuation, err, multiline, ok

__all__ = [
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "MAX_REPLY_LINE",
    "NEED_DATA",
    "NeedData",
    "ClientConnection",
    "Command",
    "Data",
    "DotStuffer",
    "EndOfData",
    "Event",
    "Line",
    "LineReader",
    "LineTooLong",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplyReader",
    "Status",
    "apop_digest",
    "continuation",
    "err",
    "multiline",
    "ok",
    "parse_capa",
    "parse_command",
    "parse_greeting_timestamp",
    "parse_number",
    "parse_scan_listing",
    "parse_uidl_listing",
    "to_crlf",
    "wire_size",
]
