"""The ``pop3proxy`` command line."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from pop3proxy import __version__
from pop3proxy.config import ConfigError, Settings, find_config, load_settings, masked

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _settings(args: argparse.Namespace, **overrides) -> Settings:
    try:
        return load_settings(args.config, **overrides)
    except ConfigError as exc:
        raise CliError(f"config error: {exc}", EXIT_USAGE) from None


def _run(main: Callable[[], Awaitable[object]]) -> None:
    import trio

    from pop3proxy.errors import ListenError, StartupError

    try:
        trio.run(main)
    except StartupError as exc:
        raise CliError(str(exc), EXIT_USAGE if isinstance(exc, ListenError) else EXIT_FAILURE) from None
    except BaseExceptionGroup as group:  # a listener started inside the service's nursery
        startup, rest = group.split(StartupError)
        if startup is None or rest is not None:
            raise
        first = _first_leaf(startup)
        raise CliError(str(first), EXIT_USAGE if isinstance(first, ListenError) else EXIT_FAILURE) from None
    except KeyboardInterrupt:
        pass


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from pop3proxy.ops.logs import setup_logging

    setup_logging(settings.log)
    from pop3proxy.app import notify_systemd, run_until_signal
    from pop3proxy.workers import serve, worker_count

    def ready(ports: object) -> None:  # every listener accepts connections (all workers')
        notify_systemd("READY=1")

    workers = worker_count(settings)
    if workers > 1:
        serve(settings, workers, _run, on_ready=ready)
        return 0
    _run(lambda: run_until_signal(settings, on_ready=ready))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pop3proxy import demo

    _setup_logging("warning" if not args.verbose else "info")
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be 0-65535", EXIT_USAGE)
    with tempfile.TemporaryDirectory(prefix="pop3proxy-demo-") as tmp:

        def ready(ports) -> None:
            print(demo.try_it_lines(args.host, ports.plain, ports.web), flush=True)

        _run(lambda: demo.run_demo(Path(tmp), args.host, args.port, ready))
    print("pop3proxy demo stopped.", flush=True)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        source = find_config(args.config)
    except ConfigError as exc:
        raise CliError(f"config error: {exc}", EXIT_USAGE) from None
    settings = _settings(args)
    from pop3proxy.filtering.api import FilterConfigError
    from pop3proxy.filtering.pipeline import build_pipeline

    try:
        build_pipeline(settings.filters, processes=settings.sync.filter_processes)
    except FilterConfigError as exc:
        raise CliError(f"config error: {exc}", EXIT_USAGE) from None
    print(f"# effective configuration from {source or '(built-in defaults)'} and POP3PROXY_* variables")
    print(json.dumps(masked(settings), indent=2, default=str))
    if settings.standalone and settings.local.users_file is None:
        print("warning: neither upstream.host nor local.users_file is set: `serve` has nothing to serve",
              file=sys.stderr)
    return 0


def _ask_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise CliError("no terminal to ask for the password: use --password-stdin", EXIT_USAGE)
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise CliError("the passwords differ; nothing changed")
    if not password:
        raise CliError("empty password refused; nothing changed", EXIT_USAGE)
    return password


def _oauth_passwd(args: argparse.Namespace, settings: Settings) -> int:
    """The local password a legacy client logs in with to an OAuth2 account (the token stays)."""
    from pop3proxy.errors import StartupError
    from pop3proxy.proxy.oauth import set_local_password
    from pop3proxy.store.engines import token_store

    password = _ask_password(args)
    try:
        with token_store(settings) as store:
            set_local_password(store, args.name, password)
    except (ValueError, OSError, StartupError) as exc:
        raise CliError(f"cannot set the password of {args.name}: {exc}") from None
    print(f"local password set for the OAuth2 account {args.name}")
    return 0


def cmd_oauth(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("warning")
    from pop3proxy.proxy.oauth.cli import oauth_command

    return oauth_command(settings, args)


def cmd_adduser(args: argparse.Namespace) -> int:
    from pop3proxy.proxy.credentials import UsersFileError, set_password

    users_file = args.users_file
    if users_file is None:
        settings = _settings(args)
        oauth_account = settings.accounts.get(args.name)
        if args.command == "passwd" and oauth_account is not None and oauth_account.oauth2 is not None:
            return _oauth_passwd(args, settings)
        users_file = settings.local.users_file
        if users_file is None:
            raise CliError("no users file: pass --users-file or set local.users_file", EXIT_USAGE)
    password = _ask_password(args)
    try:
        set_password(Path(users_file), args.name, password)
    except (UsersFileError, OSError) as exc:
        raise CliError(str(exc)) from None
    print(f"password set for {args.name} in {users_file}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("warning")
    if settings.standalone:
        raise CliError("sync needs a provider: set upstream.host", EXIT_USAGE)
    names = [args.account] if args.account else list(settings.accounts)
    if args.account and args.account not in settings.accounts:
        raise CliError(f"no [accounts.{args.account!r}] section in the configuration", EXIT_USAGE)

    from pop3proxy.app import build_backend
    from pop3proxy.errors import StartupError
    from pop3proxy.net.endpoint import UpstreamError
    from pop3proxy.proxy.backend import ProxyBackend
    from pop3proxy.proxy.oauth import NeedsAuthorisation, TokenUnavailable
    from pop3proxy.store.api import MailboxBusy, StateError

    try:
        backend = build_backend(settings)
    except StartupError as exc:
        raise CliError(str(exc)) from None
    assert isinstance(backend, ProxyBackend)  # a provider is configured (checked above)
    names = [name for name in names if name in backend.passwords or name in backend.oauth]
    if not names:
        raise CliError("no account has a password source (password_file or password_env) or oauth2 to sync with")
    failures = 0
    tty = sys.stderr.isatty()

    def bar(name: str):
        def progress(done: int, total: int) -> None:
            if tty:
                width = 30
                filled = width * done // max(total, 1)
                sys.stderr.write(f"\r{name}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
                sys.stderr.flush()

        return progress

    async def run() -> None:
        try:
            await sync_all()
        finally:
            await backend.aclose()

    async def sync_all() -> None:
        nonlocal failures
        for name in names:
            try:
                result = await backend.sync_account(name, backend.passwords.get(name), progress=bar(name))
            except MailboxBusy:
                failures += 1
                print(f"{name}: in use by a session or another sync; try again later", file=sys.stderr)
                continue
            except (UpstreamError, OSError, StateError, NeedsAuthorisation, TokenUnavailable) as exc:
                failures += 1
                print(f"{name}: sync failed: {exc}", file=sys.stderr)
                continue
            if tty:
                sys.stderr.write("\n")
            print(
                f"{name}: {result.fetched} new messages ({result.fetched_bytes} bytes), "
                f"{result.deleted_upstream} deleted upstream"
            )

    _run(run)
    return 1 if failures else 0


def cmd_filter(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("error")
    import trio

    from pop3proxy.filtering.api import FilterConfigError, FilterContext
    from pop3proxy.filtering.pipeline import build_pipeline
    from pop3proxy.filtering.summary import change_summary

    try:
        pipeline = build_pipeline(settings.filters, processes=settings.sync.filter_processes)
    except FilterConfigError as exc:
        raise CliError(f"config error: {exc}", EXIT_USAGE) from None
    messages = []
    for name in args.files:
        try:
            messages.append((name, Path(name).read_bytes()))
        except OSError as exc:
            raise CliError(f"cannot read {name}: {exc.strerror or exc}", EXIT_USAGE) from None
    if not pipeline:
        print("no filters configured: every message is cached as it arrives")

    async def run() -> None:
        for name, data in messages:
            result = await pipeline.run(data, FilterContext(user=args.user, uid=Path(name).name))
            print(f"== {name}")
            for verdict in result.verdicts:
                print(f"verdict: {verdict}")
            for error in result.errors:
                print(f"error: {error}")
            print(f"action: {result.action}")
            for line in change_summary(data, result.data):
                print(line)

    trio.run(run)
    return 0


def cmd_held(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("warning")
    import time

    from pop3proxy.store.api import MailboxBusy, StateError
    from pop3proxy.store.held import HeldError, HeldOwner, held_owners
    from pop3proxy.store.paths import user_dir

    root, backend = settings.cache.root, settings.cache.backend
    try:
        if args.user is not None:
            if not args.user:
                raise CliError("--user: the user name is empty", EXIT_USAGE)
            owners = [HeldOwner(args.user, user_dir(root, args.user))]
        else:
            owners = held_owners(root)
        found = [(owner, item) for owner in owners for item in owner.store(root, backend).list()]
    except OSError as exc:
        raise CliError(f"cannot read the held mail under {root}: {exc.strerror or exc}") from None

    def matching(text: str) -> list:
        return [(o, i) for o, i in found if i.key == text] or [(o, i) for o, i in found if i.key.startswith(text)]

    if args.held_action == "list":
        if args.keys:
            found = [pair for text in args.keys for pair in matching(text)]
        if not found:
            what = "no held message matches" if args.keys else "no held messages"
            print(what + (f" for {args.user}" if args.user is not None else ""))
        for owner, item in found:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item.time))
            print(f"{owner.label}  {item.key}")
            print(f"  {item.action}, {item.size} bytes, held {when}, upstream uid {item.uid or '(unknown)'}")
            print(f"  From: {item.sender}")
            print(f"  Subject: {item.subject}")
            for reason in item.reasons:
                print(f"  why: {reason}")
        return 0
    if not args.keys:
        raise CliError(f"held {args.held_action}: name the KEY(s) (see `pop3proxy held list`)", EXIT_USAGE)
    failures = 0
    for text in args.keys:
        matches = matching(text)
        if len(matches) != 1:
            why = "no held message has this key" if not matches else f"matches {len(matches)} held messages"
            print(f"pop3proxy: {text}: {why}", file=sys.stderr)
            failures += 1
            continue
        owner, item = matches[0]
        store = owner.store(root, backend)
        try:
            if args.held_action == "release":
                info = store.release(item.key)
                print(f"released {item.key} of {owner.label}: now served as {info.key}")
            else:
                store.delete(item.key)
                print(f"deleted {item.key} of {owner.label}")
        except KeyError:
            print(f"pop3proxy: {item.key}: no longer held", file=sys.stderr)
            failures += 1
        except MailboxBusy:
            print(f"pop3proxy: {item.key}: the mailbox of {owner.label} is in use; try again later", file=sys.stderr)
            failures += 1
        except (HeldError, StateError, OSError) as exc:
            print(f"pop3proxy: {item.key}: {exc}", file=sys.stderr)
            failures += 1
    return EXIT_FAILURE if failures else 0


def cmd_queue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("warning")
    from pop3proxy.submission.queue_cli import queue_command

    return queue_command(settings, args.action, args.ids)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from pop3proxy.admin.status import status_command

    return status_command(settings)


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from pop3proxy.errors import StartupError
    from pop3proxy.store.engines import upgrade_database

    try:
        print(upgrade_database(settings))
    except StartupError as exc:
        raise CliError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pop3proxy", description="A caching, filtering POP3 proxy with offline reading."
    )
    parser.add_argument("--version", action="version", version=f"pop3proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", type=Path, metavar="FILE", help="TOML configuration file")
        return p

    serve = with_config(sub.add_parser("serve", help="run the configured service in the foreground"))
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="serve a sample mailbox with no setup (user demo, password demo)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=1110, help="port to listen on (default 1110)")
    demo.add_argument("--verbose", "-v", action="store_true", help="log each session")
    demo.set_defaults(func=cmd_demo)

    check = with_config(sub.add_parser("check-config", help="print the effective configuration, secrets masked"))
    check.set_defaults(func=cmd_check_config)

    sub.add_parser(
        "train", add_help=False,
        help="teach the built-in spam filter: --spam PATH --ham PATH [--database FILE]",
    )

    sync = with_config(sub.add_parser("sync", help="fetch new mail for configured accounts now"))
    sync.add_argument("--account", help="only this [accounts] entry")
    sync.set_defaults(func=cmd_sync)

    filt = with_config(
        sub.add_parser("filter", help="run the configured filters on message files and show what they do"))
    filt.add_argument("files", nargs="+", metavar="FILE", help="a message file (RFC 5322, as a mail provider sends it)")
    filt.add_argument("--user", default="cli", help="user name the filters see (default: cli)")
    filt.set_defaults(func=cmd_filter)

    held = sub.add_parser("held", help="list, release or delete messages the filters held back")
    held_actions = held.add_subparsers(dest="held_action", metavar="ACTION", required=True)
    for action, text in (
        ("list", "show held messages: why, when, From and Subject (never a body)"),
        ("release", "move held messages into their user's mailbox"),
        ("delete", "delete held messages for good (they are not fetched again)"),
    ):
        act = with_config(held_actions.add_parser(action, help=text))
        act.add_argument("keys", nargs="*", metavar="KEY", help="held message key (a unique beginning is enough)")
        act.add_argument("--user", help="only this user's held mail (default: every user)")
        act.set_defaults(func=cmd_held)

    queue = with_config(
        sub.add_parser("queue", help="list, retry now or delete outgoing mail waiting for the provider"))
    queue.add_argument("action", choices=["list", "flush", "delete"])
    queue.add_argument("ids", nargs="*", metavar="ID", help="queue entries (default: all; delete needs them)")
    queue.set_defaults(func=cmd_queue)

    status = with_config(sub.add_parser("status", help="per account: last sync, cached, held and queued mail"))
    status.set_defaults(func=cmd_status)

    db = sub.add_parser("db", help="the cluster's database ([cluster] database)")
    db_actions = db.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    upgrade = with_config(db_actions.add_parser(
        "upgrade", help="create or upgrade the schema (before starting nodes of a new version)"))
    upgrade.set_defaults(func=cmd_db)

    oauth = sub.add_parser("oauth", help="authorise OAuth2 accounts and show their tokens' state")
    oauth_actions = oauth.add_subparsers(dest="oauth_action", metavar="ACTION", required=True)
    login = with_config(oauth_actions.add_parser("login", help="get the first token for an account (once)"))
    login.add_argument("account", help="an [accounts] entry with an oauth2 table")
    login.add_argument("--flow", choices=["device", "code", "client_credentials"],
                       help="device code (default when the account has a device_url), authorization code with "
                            "PKCE and a redirect to 127.0.0.1, or client credentials (grant = client_credentials)")
    login.add_argument("--port", type=int, default=0, help="port of the one-shot redirect listener (default: any free)")
    login.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the user (default 300)")
    login.set_defaults(func=cmd_oauth)
    ostatus = with_config(oauth_actions.add_parser("status", help="each OAuth2 account's token state and expiry"))
    ostatus.add_argument("--json", action="store_true", help="machine-readable output")
    ostatus.set_defaults(func=cmd_oauth)

    for name in ("adduser", "passwd"):
        text = ("add a local user or change its password (standalone mode)" if name == "adduser" else
                "change a local user's password, or set an OAuth2 account's local password")
        add = with_config(sub.add_parser(name, help=text))
        add.add_argument("name", help="user name")
        add.add_argument("--users-file", type=Path, help="users file (default: local.users_file)")
        add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        add.set_defaults(func=cmd_adduser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["train"]:
        from pop3proxy.filtering.loader import filter_command

        train = filter_command("train")
        if train is None:
            print("pop3proxy: train: no installed filter offers it (the spam filter does)", file=sys.stderr)
            return EXIT_USAGE
        return train(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except CliError as exc:
        print(f"pop3proxy: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line for the person at the terminal, the details in the log
        logging.getLogger("pop3proxy").debug("internal error", exc_info=True)
        print(f"pop3proxy: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
