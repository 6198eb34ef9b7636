"""``pop3proxy oauth login ACCOUNT`` and ``pop3proxy oauth status``."""

from __future__ import annotations

import argparse
import json
import sys

from pop3proxy.config import OAuth2Settings, Settings
from pop3proxy.errors import StartupError
from pop3proxy.proxy.oauth import flows, login
from pop3proxy.store.engines import token_store
from pop3proxy.store.tokens_api import TokenStore

EXIT_USAGE = 2
EXIT_FAILURE = 1


def oauth_accounts(settings: Settings) -> dict[str, OAuth2Settings]:
    return {name: account.oauth2 for name, account in settings.accounts.items() if account.oauth2 is not None}


def _print(text: str) -> None:
    print(text, flush=True)


def oauth_command(settings: Settings, args: argparse.Namespace) -> int:
    """`pop3proxy oauth ...` on the token store the settings name (a cluster's database, or files)."""
    try:
        with token_store(settings) as store:
            return _oauth_command(settings, args, store)
    except StartupError as exc:
        print(f"pop3proxy: oauth: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _oauth_command(settings: Settings, args: argparse.Namespace, store: TokenStore) -> int:
    accounts = oauth_accounts(settings)
    if args.oauth_action == "status":
        rows = login.status(store, accounts)
        print(json.dumps(rows, indent=1) if args.json else login.format_status(rows))
        return 0
    oauth = accounts.get(args.account)
    if oauth is None:
        print(f"pop3proxy: {args.account!r} is not an [accounts] entry with an oauth2 table", file=sys.stderr)
        return EXIT_USAGE
    flow = args.flow
    if flow is None:
        if oauth.grant == "client_credentials":
            flow = "client_credentials"
        else:
            flow = "device" if oauth.endpoint("device_url") else "code"
    try:
        login.login(store, args.account, oauth, flow, _print, port=args.port, timeout=args.timeout)
    except flows.OAuthFailure as exc:
        print(f"pop3proxy: oauth login {args.account}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        print(f"pop3proxy: oauth login {args.account}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
