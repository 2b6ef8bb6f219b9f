"""The registry core: name -> object tables for pluggable parts, importing no plugin.

Plugin modules (split methods, merge operators, compressions, launchers, model presets) import this
module and register their objects with :func:`register`; :mod:`merit.plugins` is the one place that
imports the built-in plugin modules and answers lookups. So imports run one way —
``plugins -> plugin modules -> registry`` — and adding a plugin is its file plus one line in
``merit.plugins.BUILTIN_MODULES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from merit.errors import ConfigError

T = TypeVar("T")

_TABLES: dict[str, dict[str, Any]] = {}


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: ``@register("merge", "uniform")`` adds the decorated object under ``kind/name``."""

    def add(obj: T) -> T:
        table = _TABLES.setdefault(kind, {})
        if name in table:
            raise RuntimeError(f"{kind} {name!r} registered twice")
        table[name] = obj
        return obj

    return add


def lookup(kind: str, name: str, *, field: str | None = None) -> Any:
    """The object registered as ``kind/name`` so far; a ConfigError naming ``field`` and the known names
    otherwise. Loads nothing: use :func:`merit.plugins.get` unless the caller is the registering module."""
    table = _TABLES.get(kind, {})
    if name not in table:
        where = f"{field}: " if field else ""
        raise ConfigError(f"{where}unknown {kind} {name!r}; known: {', '.join(sorted(table)) or '(none)'}")
    return table[name]


def registered(kind: str) -> list[str]:
    """Names registered so far under ``kind``, sorted."""
    return sorted(_TABLES.get(kind, {}))


def registered_kinds() -> list[str]:
    return sorted(_TABLES)
