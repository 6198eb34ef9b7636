"""Configuration: a TOML file merged under ``POP3PROXY_*`` environment variables.

``load_settings(path)`` is the one entry point. Environment variables win over the file; nested keys
use ``__``: ``POP3PROXY_UPSTREAM__HOST=pop.example.com``. Every problem (a named file that does not
exist, TOML syntax, an unknown key, a bad value) becomes a ``ConfigError`` whose message names the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pop3proxy.config.sections import (
    MAX_WORKERS,
    OAUTH2_PRESETS,
    AccountSettings,
    CacheSettings,
    ClusterSettings,
    ListenSettings,
    LocalSettings,
    LogSettings,
    MetricsSettings,
    OAuth2Settings,
    OfflineSettings,
    RouteSettings,
    SmtpSettings,
    SmtpUpstreamSettings,
    SyncSettings,
    ThrottleSettings,
    UpstreamSettings,
    WebSettings,
    usable_cpus,
)
from pop3proxy.errors import ConfigError

__all__ = [
    "MAX_WORKERS", "OAUTH2_PRESETS", "AccountSettings", "CacheSettings", "ClusterSettings", "ConfigError",
    "ListenSettings", "LocalSettings", "LogSettings", "MetricsSettings", "OAuth2Settings", "OfflineSettings",
    "RouteSettings", "Settings", "SmtpSettings", "SmtpUpstreamSettings", "SyncSettings", "ThrottleSettings",
    "UpstreamSettings", "WebSettings", "load_settings", "masked", "queue_dir", "usable_cpus",
]

SECRET_KEYS = frozenset({"password", "secret", "token"})
_NOT_SECRET = frozenset(
    {"password_file", "password_env", "client_secret_file", "token_url", "controller_password_file",
     "database_password_file"}
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="POP3PROXY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )
    _toml_file: ClassVar[Path | None] = None

    listen: ListenSettings = Field(default_factory=ListenSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    routes: dict[str, RouteSettings] = Field(
        default_factory=dict, description="Domain → provider, for user@domain logins.")
    accounts: dict[str, AccountSettings] = Field(default_factory=dict, description="Per-user overrides.")
    cache: CacheSettings = Field(default_factory=CacheSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    offline: OfflineSettings = Field(default_factory=OfflineSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    throttle: ThrottleSettings = Field(default_factory=ThrottleSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    cluster: ClusterSettings | None = Field(
        None, description="Several nodes sharing state in PostgreSQL (docs/CLUSTER.md); unset: one machine.")
    filters: list[dict[str, Any]] = Field(default_factory=list, description="The filter pipeline, in order.")

    @field_validator("filters")
    @classmethod
    def _filters_named(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, table in enumerate(value):
            if not isinstance(table.get("use"), str) or not table["use"]:
                raise ValueError(f"filters[{index}] needs a 'use' key naming the filter")
        return value

    @model_validator(mode="after")
    def _cluster_needs_maildir(self) -> Settings:
        if self.cluster is not None and self.cache.backend == "mbox":
            raise ValueError("cache.backend = \"mbox\" cannot be shared by several nodes: a cluster needs "
                             "\"maildir\" on storage every node mounts")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    @property
    def standalone(self) -> bool:
        return self.upstream.host is None


def default_config_paths() -> list[Path]:
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path("pop3proxy.toml"), xdg / "pop3proxy" / "config.toml", Path("/etc/pop3proxy/config.toml")]


def find_config(path: Path | None) -> Path | None:
    """The file to read: the named one (which must exist), else the first default that exists."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    for candidate in default_config_paths():
        if candidate.is_file():
            return candidate
    return None


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown setting"
    if (
        "input" in error
        and error["type"] not in ("missing",)
        and not isinstance(error["input"], (dict, list))
        and not any(secret in key.lower() for secret in SECRET_KEYS | {"database"})  # a URL may hold one
    ):
        return f"{key}: {message} (got {error['input']!r})"
    return f"{key}: {message}"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the configuration; ``overrides`` (init values) win over environment and file."""
    config_file = find_config(path)
    if config_file is not None:
        try:
            with open(config_file, "rb") as f:
                tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: invalid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {config_file}: {exc.strerror}") from None
    Settings._toml_file = config_file
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        where = f"{config_file}: " if config_file else ""
        lines = [_describe(error) for error in exc.errors()]
        raise ConfigError(where + "; ".join(lines)) from None
    finally:
        Settings._toml_file = None
    return settings


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, with secrets replaced by ``***``."""

    def mask(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: mask(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v, key) for v in value]
        if any(secret in key.lower() for secret in SECRET_KEYS) and key not in _NOT_SECRET:
            return "***" if value not in (None, "") else value
        if isinstance(value, Path):
            return str(value)
        return value

    return mask(settings.model_dump(mode="python"))


def queue_dir(settings) -> Path:
    """The outgoing queue: ``smtp.queue_dir``, else ``.queue`` below the cache root (a name no user's
    cache directory can have)."""
    return Path(settings.smtp.queue_dir) if settings.smtp.queue_dir else Path(settings.cache.root) / ".queue"
