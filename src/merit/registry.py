"""One small registry for pluggable parts (split methods, merge operators, launchers).

Each kind is a name -> object table. An unknown name is a user error that lists the known ones.
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


def get(kind: str, name: str, *, field: str | None = None) -> Any:
    """The object registered as ``kind/name``; a ConfigError naming ``field`` and the known names otherwise."""
    _load_builtins()
    table = _TABLES.get(kind, {})
    if name not in table:
        where = f"{field}: " if field else ""
        raise ConfigError(f"{where}unknown {kind} {name!r}; known: {', '.join(sorted(table)) or '(none)'}")
    return table[name]


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    _load_builtins()
    return sorted(_TABLES.get(kind, {}))


def kinds() -> list[str]:
    _load_builtins()
    return sorted(_TABLES)


def _load_builtins() -> None:
    # Importing the modules runs their @register decorators; done lazily so that the
    # registry module itself imports nothing heavy.
    import merit.merge.operators  # noqa: F401
    import merit.models.presets  # noqa: F401
    import merit.split.partition  # noqa: F401
    import merit.conflict.compress  # noqa: F401
    import merit.launch.local  # noqa: F401
    import merit.launch.ray  # noqa: F401  (imports Ray only when used)
    import merit.launch.slurm  # noqa: F401  (imports submitit only when used)
