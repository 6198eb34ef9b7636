"""The application: routing, credentials, accounts, sync and the backends the POP3 server drives."""
