"""Loading filters from `[[filters]]` tables: built-ins and third-party plugins by entry point,
or module:Class; a bad plugin fails at load time, naming it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from pop3proxy.filtering.api import (
    ENTRY_POINT_GROUP,
    CommonOptions,
    Filter,
    FilterConfigError,
    FilterContext,
)

log = logging.getLogger("pop3proxy.filters")


BUILTIN_PACKAGE = "pop3proxy.filters"


def _import_error(use: str, module_name: str, exc: BaseException) -> FilterConfigError:
    return FilterConfigError(f"filter {use!r}: cannot import {module_name}: {type(exc).__name__}: {exc}")


def _builtin(use: str) -> Any:
    """A built-in filter by its module name, for a source tree whose entry points are not installed."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", use):
        return None
    module_name = f"{BUILTIN_PACKAGE}.{use}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (BUILTIN_PACKAGE, module_name):
            return None
        raise _import_error(use, module_name, exc) from None
    except Exception as exc:
        raise _import_error(use, module_name, exc) from None
    cls = getattr(module, "FILTER", None)
    if cls is None:
        raise FilterConfigError(f"filter {use!r}: {module_name} defines no FILTER class")
    return cls


def _resolve(use: str) -> Any:
    """The filter class named by ``use``: module:Class, else a built-in, else an entry point."""
    if ":" in use:
        module_name, _, attr = use.partition(":")
        if not module_name or not attr:
            raise FilterConfigError(f"filter {use!r}: expected module:Class")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise _import_error(use, module_name, exc) from None
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise FilterConfigError(f"filter {use!r}: {module_name} has no {attr}") from None
        return obj
    candidates = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == use]
    # Built-ins first: an installed package cannot silently replace one.
    candidates.sort(key=lambda ep: not ep.value.startswith(BUILTIN_PACKAGE + "."))
    if not any(ep.value.startswith(BUILTIN_PACKAGE + ".") for ep in candidates):
        builtin = _builtin(use)
        if builtin is not None:
            return builtin
    for ep in candidates:
        try:
            return ep.load()
        except Exception as exc:
            raise FilterConfigError(
                f"filter {use!r}: cannot load entry point {ep.value}: {type(exc).__name__}: {exc}"
            ) from None
    raise FilterConfigError(f"unknown filter {use!r} (not built in, no entry point, not module:Class)")


def filter_class(use: str) -> Any:
    """The filter class that ``use = "..."`` names (built-in, entry point or module:Class)."""
    return _resolve(use)


def filter_command(command: str) -> Callable[[list[str]], int] | None:
    """The CLI command a filter plugin offers under this name (``commands = {"train": f}``)."""
    names = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for name in dict.fromkeys(["spam", *names]):
        try:
            cls = _resolve(name)
        except FilterConfigError:
            continue
        found = getattr(cls, "commands", {}).get(command)
        if found is not None:
            return found
    return None


def _first_error(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    return ".".join(map(str, first["loc"])), first["msg"]


def load_filter(table: dict[str, Any], index: int = 0) -> tuple[Filter, CommonOptions]:
    """Build one filter from its ``[[filters]]`` table; every problem names the filter."""
    where = f"filters[{index}]"
    common_keys = set(CommonOptions.model_fields)
    try:
        common = CommonOptions(**{k: v for k, v in table.items() if k in common_keys})
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        raise FilterConfigError(f"{where}.{loc}: {msg}") from None
    label = f"{where} ({common.use})"
    try:
        cls = _resolve(common.use)
    except FilterConfigError as exc:
        raise FilterConfigError(f"{where}: {exc}") from None
    name = getattr(cls, "name", None)
    config_model = getattr(cls, "Config", None)
    if not inspect.isclass(cls) or not isinstance(name, str) or not name:
        raise FilterConfigError(f"{label}: not a filter class (it needs a 'name' and a call)")
    if config_model is not None and not (inspect.isclass(config_model) and issubclass(config_model, BaseModel)):
        raise FilterConfigError(f"{label}: its Config is not a pydantic model")
    options = {k: v for k, v in table.items() if k not in common_keys}
    # A class whatever its signature; what its instances are is checked below (callable, its call's arguments).
    factory: Callable[..., Any] = cls
    try:
        if config_model is None:
            if options:
                raise FilterConfigError(f"{label}: unknown option(s) {', '.join(sorted(options))}")
            instance = factory()
        else:
            lenient = config_model.model_config.get("extra") in (None, "ignore")
            if lenient:  # pydantic would drop a misspelt option silently
                unknown = set(options) - set(config_model.model_fields)
                unknown -= {f.alias for f in config_model.model_fields.values() if f.alias}
                if unknown:
                    raise FilterConfigError(f"{label}: unknown option(s) {', '.join(sorted(unknown))}")
            model = config_model.model_validate(options)
            instance = factory(model)
    except FilterConfigError:
        raise
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        raise FilterConfigError(f"{label}.{loc}: {msg}" if loc else f"{label}: {msg}") from None
    except Exception as exc:
        raise FilterConfigError(f"{label}: cannot start: {type(exc).__name__}: {exc}") from None
    if not callable(instance):
        raise FilterConfigError(f"{label}: instances are not callable")
    try:
        inspect.signature(instance).bind(b"", FilterContext(user="", uid=""))
    except TypeError:
        raise FilterConfigError(f"{label}: its call must take (message, context)") from None
    except ValueError:  # no signature to inspect (a builtin): it will show at the first message
        pass
    return instance, common
