"""The plugin registry: imports run one way, every plugin is listed with a description."""

from __future__ import annotations

import ast
from pathlib import Path

import merit
from merit import plugins
from merit.cli import main

SRC = Path(merit.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (both are import edges)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _module_file(name: str) -> Path:
    parts = name.split(".")[1:]
    path = SRC.joinpath(*parts)
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"


def test_registry_core_imports_no_plugin():
    merit_imports = {m for m in _imports(SRC / "registry.py") if m.startswith("merit")}
    assert merit_imports <= {"merit.errors", "merit.errors.ConfigError"}, merit_imports


def test_no_plugin_module_imports_the_plugin_loader():
    # plugins -> plugin modules -> registry: a plugin importing merit.plugins would close a circle.
    for module in plugins.BUILTIN_MODULES:
        imported = _imports(_module_file(module))
        assert not any(m == "merit.plugins" or m.startswith("merit.plugins.") for m in imported), module
        # it registers: through the core, or through the merge operators' decorator (which uses the core)
        assert imported & {"merit.registry.register", "merit.merge.operators.operator"}, module


def test_every_plugin_has_a_one_line_description(capsys):
    for kind in plugins.kinds():
        for name in plugins.names(kind):
            text = plugins.describe(kind, name)
            assert text and "\n" not in text, (kind, name)
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for kind in plugins.kinds():
        assert f"{plugins.KIND_TITLES.get(kind, kind)}:" in out
        for name in plugins.names(kind):
            line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
            assert plugins.describe(kind, name) in line
    assert "pca-median" in out and "token-weighted" in out


def test_an_unknown_name_lists_the_known_ones():
    import pytest

    from merit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"split\.method: unknown split 'pca'; known: .*pca-median"):
        plugins.get("split", "pca", field="split.method")
