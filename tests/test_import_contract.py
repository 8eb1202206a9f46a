"""The layer contract, read from the source with `ast` (module-level, function-level and TYPE_CHECKING imports
alike): views and widgets import no torch and nothing of the engine but `analysis.PUBLIC_SURFACE`; the engine
imports nothing of the app or of its UI libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_DIRS = ("diffract_tui/views", "diffract_tui/widgets")
APP_ROOTS = ("diffract_tui", "textual", "textual_plotext", "plotext", "typer", "rich")


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source` (relative imports resolved against `package`);
    `from a import b` yields both `a` and `a.b`, since `b` may be a submodule."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return sorted(out)


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] != "__init__" else parts[:-1])


def _is_under(module: str, root: str) -> bool:
    return module == root or module.startswith(root + ".")


def ui_violations(source: str, package: str, surface: tuple[str, ...]) -> list[str]:
    """What a view/widget source imports against the contract: torch, or engine modules outside `surface`."""
    bad = []
    names = imported_modules(source, package)
    found = {m for _, m in names}
    for line, module in names:
        if _is_under(module, "torch"):
            bad.append(f"{line}: {module}")
        elif _is_under(module, "analysis") and module != "analysis":
            # `from analysis.run.session import X` also yields `analysis.run.session.X`: a name, not a module
            parent = module.rsplit(".", 1)[0]
            if module in surface or (parent in surface and parent in found):
                continue
            if any(_is_under(s, module) for s in surface):  # a package on the way to the surface
                continue
            bad.append(f"{line}: {module}")
    return bad


def engine_violations(source: str, package: str) -> list[str]:
    """What an engine source imports of the app or its UI libraries."""
    return [f"{line}: {m}" for line, m in imported_modules(source, package)
            if any(_is_under(m, root) for root in APP_ROOTS)]


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_public_surface_is_declared_and_importable() -> None:
    """The surface is named in analysis/__init__.py and every entry is a real module."""
    import importlib

    from analysis import PUBLIC_SURFACE

    assert "analysis.run.session" in PUBLIC_SURFACE and "analysis.errors" in PUBLIC_SURFACE
    for name in PUBLIC_SURFACE:
        importlib.import_module(name)


@pytest.mark.parametrize("path", _files(*UI_DIRS), ids=lambda p: str(p.relative_to(ROOT)))
def test_views_and_widgets_import_only_the_public_surface(path: Path) -> None:
    from analysis import PUBLIC_SURFACE

    assert ui_violations(path.read_text(), _package_of(path), PUBLIC_SURFACE) == []


@pytest.mark.parametrize("path", _files("analysis"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_never_imports_the_app(path: Path) -> None:
    assert engine_violations(path.read_text(), _package_of(path)) == []


def test_the_checks_catch_what_they_forbid() -> None:
    """The checkers flag a function-level torch import, an engine module off the surface (also under
    TYPE_CHECKING and relative), and an engine import of textual or the app — so the tests above can fail."""
    surface = ("analysis.run.session", "analysis.errors")
    view = ("from analysis.run.session import ExplorerSession\n"
            "from analysis.errors import DiffractError\n"
            "def f():\n    import torch\n    from analysis.edit.rewind import apply_rewind\n"
            "if TYPE_CHECKING:\n    from analysis.model.architecture import ModelLayout\n")
    assert ui_violations(view, "diffract_tui.views", surface) == [
        "4: torch", "5: analysis.edit.rewind", "5: analysis.edit.rewind.apply_rewind",
        "7: analysis.model.architecture", "7: analysis.model.architecture.ModelLayout"]
    assert ui_violations("from analysis.run import scan\n", "diffract_tui.views", surface) == ["1: analysis.run.scan"]
    engine = "def g():\n    from textual.app import App\nimport diffract_tui\nfrom ..run import cache\n"
    assert engine_violations(engine, "analysis.deltas") == ["2: textual.app", "2: textual.app.App", "3: diffract_tui"]
    assert engine_violations("from .. import x\n", "analysis.deltas") == []
