"""Trio adapters: the only code that touches sockets and ssl (POP3 server and client, TLS)."""
