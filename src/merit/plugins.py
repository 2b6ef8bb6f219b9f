"""The built-in plugins: the one module that imports them, and the lookups everyone else uses.

A plugin module registers its objects with :func:`merit.registry.register` when imported. Adding one
(a merge operator, a split method, a launcher, ...) is its file plus one line in ``BUILTIN_MODULES``.
Modules are imported on the first lookup, so ``import merit.plugins`` itself is cheap, and optional
engines (Ray, submitit) are imported only when their launcher runs.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from merit import registry

BUILTIN_MODULES = (
    "merit.models.presets",
    "merit.conflict.compress",
    "merit.split.partition",
    "merit.merge.operators",
    "merit.merge.spectral",
    "merit.launch.local",
    "merit.launch.ray",
    "merit.launch.slurm",
)

KIND_TITLES = {"model-preset": "model presets", "compression": "gradient compression", "split": "split methods",
               "merge": "merge operators", "launcher": "launchers"}

_loaded = False


def load() -> None:
    """Import every built-in plugin module once (their decorators fill the registry)."""
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def get(kind: str, name: str, *, field: str | None = None) -> Any:
    """The plugin registered as ``kind/name``; a ConfigError naming ``field`` and the known names otherwise."""
    load()
    return registry.lookup(kind, name, field=field)


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    load()
    return registry.registered(kind)


def kinds() -> list[str]:
    load()
    return registry.registered_kinds()


def describe(kind: str, name: str) -> str:
    """A plugin's one-line description: the first line of its docstring (a merge operator's function's)."""
    obj = get(kind, name)
    target = getattr(obj, "fn", obj)  # a MergeOperator wraps its per-tensor function
    doc = inspect.getdoc(target) or ""
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""
