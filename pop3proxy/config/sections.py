"""The settings' sections: one pydantic model per ``[table]`` of the configuration file."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


MAX_WORKERS = 64


def usable_cpus() -> int:
    """The CPUs this process may run on (``listen.workers = 0``, ``sync.filter_processes = "auto"``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ListenSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the POP3 listeners bind to.")
    port: int | None = Field(
        1110, ge=0, le=65535, description="Plain POP3 port (STLS offered when a certificate is set); empty to disable.")
    tls_port: int | None = Field(None, ge=0, le=65535, description="Implicit TLS (POP3S) port; unset disables it.")
    certfile: Path | None = Field(None, description="PEM certificate chain for STLS and POP3S.")
    keyfile: Path | None = Field(None, description="PEM private key; defaults to certfile.")
    allow_plaintext_auth: Literal["loopback", "always", "never"] = Field(
        "loopback",
        description="Where USER/PASS and AUTH PLAIN are allowed without TLS: loopback clients only, always, or never.",
    )
    idle_timeout: float = Field(
        600.0, gt=0, description="Seconds a client may stay silent (RFC 1939 asks for at least 10 minutes).")
    max_sessions: int = Field(
        1000, ge=1, description="Concurrent client sessions; further clients get -ERR [SYS/TEMP].")
    login_timeout: float = Field(
        60.0, gt=0, description="Seconds from the greeting to a successful login, however active the client is."
    )
    max_unauthenticated: int = Field(
        200, ge=1, description="Connections not logged in yet; a new one closes the oldest idle one beyond this."
    )
    output_buffer: int = Field(
        1 << 20, ge=4096, description="Octets of replies one session holds before it waits for the client to read them."
    )
    tls_handshake_timeout: float = Field(30.0, gt=0, description="Seconds a client has to finish a TLS handshake.")
    tls_min_version: Literal["1.0", "1.1", "1.2", "1.3"] = Field(
        "1.2", description="Lowest TLS version offered to clients; 1.0/1.1 only for legacy clients (logged as a "
        "warning)."
    )
    max_sessions_per_address: int = Field(50, ge=1, description="Concurrent sessions from one client address.")
    max_bad_commands: int = Field(20, ge=1, description="Invalid commands a session may send before it is closed.")
    proxy_protocol: bool = Field(
        False, description="Expect a PROXY protocol header (v1 or v2) from a load balancer before each connection; "
        "its client address is the one the throttle, logs and metrics see.")
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Networks a PROXY protocol header is accepted from; a connection from elsewhere is closed.")
    proxy_protocol_timeout: float = Field(
        5.0, gt=0, description="Seconds a connection has to send its whole PROXY protocol header; then it is closed.")
    workers: int = Field(
        0, ge=0, le=MAX_WORKERS,
        description="Processes serving POP3 clients, sharing the listening sockets (`serve` only); 0 = one per CPU, "
                    "1 = everything in one process.",
    )

    @model_validator(mode="after")
    def _tls_needs_cert(self) -> ListenSettings:
        if self.tls_port is not None and self.certfile is None:
            raise ValueError("tls_port needs certfile (and keyfile) to be set")
        if self.port is None and self.tls_port is None:
            raise ValueError("set port or tls_port: nothing would listen")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an address or network (e.g. 10.0.0.0/8)") from None
        return value


class UpstreamSettings(_Section):
    host: str | None = Field(
        None, description="The provider's POP3 server; unset means standalone mode (local users file).")
    port: int | None = Field(
        None, ge=1, le=65535, description="Provider port; default 995 for implicit TLS, 110 otherwise.")
    tls: Literal["implicit", "starttls", "none"] = Field(
        "implicit", description="How to secure the provider connection.")
    ca_file: str = Field("", description="CA bundle to verify the provider; empty uses the system trust store.")
    tls_min_version: Literal["1.2", "1.3"] = Field("1.2", description="Lowest TLS version accepted from the provider.")
    auth: list[Literal["apop", "plain", "user"]] = Field(
        ["plain", "user", "apop"], description="Login methods to try upstream, in order of preference."
    )
    delete: Literal["mirror", "after_fetch", "never"] = Field(
        "mirror", description="What happens upstream to mail the client deletes.")
    delete_after_days: int | None = Field(
        None, ge=0, description="Also delete upstream copies older than this many days once cached.")
    early_connect: bool = Field(
        True, description="Connect to this provider while a client greets (saves a round trip; needed for APOP and "
        "CRAM-MD5).")
    early_connections: int = Field(
        64, ge=0, description="Most provider connections opened early at once; more clients are served without.")
    pass_challenges: list[Literal["apop", "cram-md5"]] = Field(
        ["apop"], description="Challenge-response logins passed to the default provider when it offers them "
        "(its APOP timestamp in the greeting, its CRAM-MD5 challenge relayed); such sessions have no offline login.")
    forward_client_address: bool = Field(
        False, description="Send the client's address to the provider (XCLIENT; Dovecot with login_trusted_networks).")
    case_sensitive_users: bool = Field(
        False, description="The providers tell user names apart by case (Bob is not bob): one cache per spelling."
    )
    vanished: Literal["keep", "drop"] = Field(
        "keep", description="Cached messages the provider no longer lists: keep serving them, or drop them from the "
        "cache."
    )
    timeout: float = Field(30.0, gt=0, description="Connect and read timeout for the provider, in seconds.")
    max_message_size: int = Field(
        256 * 1024 * 1024, ge=1024, description="Largest message fetched from the provider, octets; a larger one "
        "fails that sync.")
    max_listing: int = Field(
        1_000_000, ge=1, description="Most entries accepted in the provider's LIST or UIDL answer; more fail that "
        "sync.")

    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 995 if self.tls == "implicit" else 110


class RouteSettings(_Section):
    host: str
    port: int | None = Field(None, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    ca_file: str = ""
    smtp_host: str | None = Field(None, description="Submission server for this domain (default: [smtp.upstream]).")
    smtp_port: int | None = Field(None, ge=1, le=65535)
    smtp_tls: Literal["implicit", "starttls", "none"] | None = None


# Endpoints and scopes of the providers known by name (`[accounts."name".oauth2] provider = ...`).
# `{tenant}` is the Microsoft Entra tenant (`tenant`, default "common"; a service principal needs its own).
OAUTH2_PRESETS: dict[str, dict[str, Any]] = {
    "microsoft": {
        "authorization_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        "token_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "device_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        "scopes": ["https://outlook.office.com/POP.AccessAsUser.All", "offline_access"],
        "service_scopes": ["https://outlook.office365.com/.default"],
    },
    "google": {
        "authorization_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_url": "https://oauth2.googleapis.com/token",
        "device_url": "https://oauth2.googleapis.com/device/code",
        "scopes": ["https://mail.google.com/"],
        "service_scopes": ["https://mail.google.com/"],
    },
}


class OAuth2Settings(_Section):
    provider: Literal["microsoft", "google"] | None = Field(
        None, description="Preset endpoints and scopes; without it, token_url is required.")
    tenant: str = Field("common", description="Microsoft tenant (directory) name or id.")
    client_id: str = Field(description="The OAuth2 client (application) id registered with the provider.")
    client_secret: str | None = Field(None, description="Client secret, for confidential clients.")
    client_secret_file: Path | None = Field(None, description="File holding the client secret (mode 0600).")
    grant: Literal["user", "client_credentials"] = Field(
        "user", description="user: a person authorises once (device or browser flow); client_credentials: a service "
        "principal.")
    token_url: str | None = None
    authorization_url: str | None = None
    device_url: str | None = None
    scopes: list[str] | None = Field(None, description="Scopes to ask for (default: the preset's).")
    refresh_margin: float = Field(300.0, ge=0, description="Seconds before expiry at which a token is refreshed.")
    retry_max: float = Field(
        300.0, gt=0, description="Longest wait between retries of a refresh that failed transiently.")
    timeout: float = Field(30.0, gt=0, description="Seconds an authorization-server request may take.")

    @model_validator(mode="after")
    def _complete(self) -> OAuth2Settings:
        if self.client_secret is not None and self.client_secret_file is not None:
            raise ValueError("give client_secret or client_secret_file, not both")
        if self.provider is None and not self.token_url:
            raise ValueError("token_url is required without a provider preset")
        if self.grant == "client_credentials" and self.client_secret is None and self.client_secret_file is None:
            raise ValueError("the client_credentials grant needs client_secret or client_secret_file")
        return self

    def endpoint(self, name: str) -> str | None:
        """token_url / authorization_url / device_url: the account's own, else the preset's."""
        value = getattr(self, name)
        if value is None and self.provider is not None:
            value = OAUTH2_PRESETS[self.provider][name].format(tenant=self.tenant)
        return value

    def effective_scopes(self) -> list[str]:
        if self.scopes is not None:
            return list(self.scopes)
        if self.provider is None:
            return []
        key = "service_scopes" if self.grant == "client_credentials" else "scopes"
        return list(OAUTH2_PRESETS[self.provider][key])


class AccountSettings(_Section):
    host: str | None = Field(None, description="Provider for this user (default: [upstream]).")
    port: int | None = Field(None, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] | None = None
    remote_user: str | None = Field(None, description="User name at the provider, if it differs.")
    password_file: Path | None = Field(None, description="File holding the password; enables background prefetch.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    smtp_host: str | None = Field(None, description="Submission server for this user (default: [smtp.upstream]).")
    smtp_port: int | None = Field(None, ge=1, le=65535)
    smtp_tls: Literal["implicit", "starttls", "none"] | None = None
    oauth2: OAuth2Settings | None = Field(
        None, description="Log in to the provider with OAuth2; the client logs in with a local password (`pop3proxy "
        "passwd`).")


class CacheSettings(_Section):
    backend: Literal["maildir", "mbox"] = Field("maildir", description="On-disk format of the per-user cache.")
    root: Path = Field(Path("/var/lib/pop3proxy"), description="Directory holding every user's cache.")


class SyncSettings(_Section):
    login_budget: float = Field(20.0, gt=0, description="Seconds a login may spend fetching new mail before answering.")
    interval: float = Field(300.0, gt=0, description="Background prefetch period for accounts with a password source.")
    deadline: float = Field(
        600.0, gt=0, description="Seconds a whole sync pass may take before it is stopped (a trickling provider).")
    auth_cache_ttl: float = Field(
        0.0, ge=0, description="Seconds a password the provider accepted is trusted for a login served at once "
        "from the cache (the provider is asked in the background); 0: off.")
    min_check_interval: float = Field(
        0.0, ge=0, description="Seconds after a complete sync during which a login the auth cache verifies "
        "(sync.auth_cache_ttl) does not ask the provider at all, not even in the background: new mail shows "
        "up to this much later; 0: off.")
    max_filtered_size: int = Field(
        32 * 1024 * 1024, ge=1024,
        description="Largest message held in memory and passed through the filters; a larger one is streamed "
                    "to the cache unfiltered, marked with an X-POP3Proxy-Warning header.")
    filter_processes: int | Literal["auto"] = Field(
        0,
        description="Processes for filters that compute (the built-in Bayes spam check, attachments): at most "
                    "this many per POP3 worker; \"auto\" shares the CPUs among the workers; 0 (default) runs "
                    "every filter in a thread (faster where no core is idle: see docs/BENCHMARKS.md).")

    @field_validator("filter_processes")
    @classmethod
    def _processes_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 or more, or \"auto\"")
        return value


class OfflineSettings(_Section):
    enabled: bool = Field(True, description="Serve the cache when the provider is unreachable.")


class LocalSettings(_Section):
    users_file: Path | None = Field(None, description="Standalone mode: users and scrypt hashes (`pop3proxy adduser`).")


class ThrottleSettings(_Section):
    max_failures: int = Field(
        5, ge=1, description="Failed logins of one account from one client address before further attempts of that "
        "pair are refused without asking the provider; past it, attempts on the account from anywhere are delayed by "
        "max_delay.")
    address_failures: int = Field(
        20, ge=1, description="Failed logins from one client address, across accounts, before every login from it is "
        "refused.")
    window: float = Field(900.0, gt=0, description="Seconds over which failed logins are counted.")
    base_delay: float = Field(
        0.5, ge=0, description="Delay before answering a failed login; doubles with each further failure.")
    max_delay: float = Field(8.0, ge=0, description="Longest delay before answering a failed login.")


class SmtpUpstreamSettings(_Section):
    host: str | None = Field(None, description="The provider's submission server.")
    port: int | None = Field(
        None, ge=1, le=65535, description="Submission port; default 465 for implicit TLS, 587 otherwise.")
    tls: Literal["implicit", "starttls", "none"] = Field(
        "starttls", description="How to secure the submission connection.")
    ca_file: str = Field(
        "", description="CA bundle to verify the submission server; empty uses the system trust store.")
    timeout: float = Field(60.0, gt=0, description="Connect and read timeout, seconds.")


class SmtpSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the SMTP submission listener binds to.")
    port: int | None = Field(
        None, ge=0, le=65535, description="Submission listener port (plain + STARTTLS); unset disables the relay.")
    queue_dir: Path | None = Field(None, description="Outgoing queue; default <cache.root>/.queue.")
    give_up_after: float = Field(
        5 * 86400.0, gt=0, description="Seconds to keep retrying queued mail before bouncing it.")
    max_message_size: int = Field(50 * 1024 * 1024, ge=1024, description="Largest message accepted, in octets.")
    proxy_protocol: bool = Field(
        False, description="Expect a PROXY protocol header (v1 or v2) before each SMTP connection, from "
        "listen.trusted_proxies within listen.proxy_protocol_timeout; its client address is the one the relay uses.")
    upstream: SmtpUpstreamSettings = Field(default_factory=SmtpUpstreamSettings)


class MetricsSettings(_Section):
    host: str = Field("127.0.0.1", description="Address of the Prometheus metrics endpoint.")
    port: int | None = Field(None, ge=0, le=65535, description="Port of GET /metrics; unset disables it.")


class WebSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the web console binds to.")
    port: int | None = Field(
        None, ge=0, le=65535, description="Web console port (HTTPS when listen.certfile is set); unset disables it.")
    admins: list[str] = Field(
        default_factory=list, description="Users who may see and act on every account in the console.")
    session_lifetime: float = Field(3600.0, gt=0, description="Seconds a console sign-in stays valid.")
    max_sessions: int = Field(
        1000, ge=1, description="Console sessions kept at once; the oldest is signed out beyond it.")


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["text", "json"] = Field("text", description="Log line format.")


class ClusterSettings(_Section):
    database: str = Field(
        description="The shared PostgreSQL database, as a postgresql:// URL (without its password).")
    database_password_file: Path | None = Field(
        None, description="File holding the database password (mode 0600); never logged.")
    node: str = Field(
        default_factory=socket.gethostname,
        description="This node's name in the cluster (status, logs); default the host name.")
    pool_size: int = Field(10, ge=1, le=1000, description="Database connections a node process keeps at most.")
    database_timeout: float = Field(
        5.0, gt=0, description="Seconds a node waits for the database before a login gets -ERR [SYS/TEMP].")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds a node stopping (SIGTERM) lets its sessions finish before closing them.")
    heartbeat: float = Field(5.0, gt=0, description="Seconds between a node's heartbeats in the database.")

    @field_validator("database")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("not a URL (expected postgresql://user@host:port/dbname)") from None
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("expected a postgresql:// URL, e.g. postgresql://pop3proxy@db.example:5432/pop3proxy")
        if parts.password:
            raise ValueError("keep the password out of the URL: put it in database_password_file (mode 0600)")
        return value

    @field_validator("node")
    @classmethod
    def _node_name(cls, value: str) -> str:
        if not value or len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("a node name is 1 to 64 letters, digits, '-', '_' or '.'")
        return value
