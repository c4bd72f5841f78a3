"""The layers of docs/architecture.md, enforced: a module imports only from its own layer or below.

The layer table is read from docs/architecture.md itself (between the `layers` markers), so the map
and the code cannot drift apart: a new module must be placed in a layer, and an upward import (or
one command importing another) fails here. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "prefalign"
DOC = ROOT / "docs" / "architecture.md"


def read_layers(text: str) -> list[tuple[str, list[str], bool]]:
    """(name, module prefixes, independent) per layer, top first, from the doc's `layers` block."""
    block = text.split("<!-- layers:start -->")[1].split("<!-- layers:end -->")[0]
    layers = []
    for line in block.splitlines():
        match = re.match(r"^\s*([\w ]+?)(\s*\(independent\))?\s*:\s*(.+)$", line)
        if match and not line.strip().startswith("```"):
            layers.append((match.group(1).strip(), match.group(3).split(), bool(match.group(2))))
    return layers


def module_names(package_dir: Path) -> dict[str, Path]:
    """'data.collate' -> its file, for every module of the package ('' is the package itself)."""
    names = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(path: Path, package: str, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (`from pkg import sub` counts as pkg.sub)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target == package or target.startswith(package + "."):
                name = target[len(package) + 1:]
                if name in known:
                    found.add(name)
    return found


def layer_of(module: str, layers) -> int | None:
    """The index (0 = top) of the layer whose most specific prefix matches `module`; the package root is the bottom."""
    if module == "":
        return len(layers) - 1
    matches = [(len(p), i) for i, (_, prefixes, _) in enumerate(layers) for p in prefixes
               if module == p or module.startswith(p + ".")]
    return max(matches)[1] if matches else None


def _only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def violations(package_dir: Path, package: str, layers) -> list[str]:
    """Every import that goes up a layer, or across an independent layer; every module in no layer."""
    names = module_names(package_dir)
    problems = []
    for module, path in sorted(names.items()):
        own = layer_of(module, layers)
        if own is None and path.name == "__init__.py" and _only_a_docstring(path):
            continue  # an empty subpackage marker
        if own is None:
            problems.append(f"{module or package}: in no layer of the map; add it to docs/architecture.md")
            continue
        for target in sorted(imported_modules(path, package, set(names))):
            other = layer_of(target, layers)
            if other is None or target == module:
                continue
            if other < own:
                problems.append(f"{module} imports {target}: {layers[own][0]} may not import from {layers[other][0]}")
            elif other == own and layers[own][2] and _top(target, layers[own][1]) != _top(module, layers[own][1]):
                problems.append(f"{module} imports {target}: the {layers[own][0]} do not import each other")
    return problems


def _top(module: str, prefixes: list[str]) -> str:
    return max((p for p in prefixes if module == p or module.startswith(p + ".")), key=len)


def test_the_package_keeps_the_layers_of_the_map():
    layers = read_layers(DOC.read_text(encoding="utf-8"))
    assert len(layers) >= 8, layers
    assert violations(PACKAGE, "prefalign", layers) == []


def test_the_checker_catches_an_upward_import_a_command_importing_a_command_and_a_stray_module(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "data").mkdir(parents=True)
    for name in ("__init__", "errors", "cli", "evaluate", "chat", "data/__init__", "data/collate"):
        (pkg / f"{name}.py").write_text("")
    (pkg / "stray.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from pkg.cli import main  # upward, inside a function\n")
    (pkg / "evaluate.py").write_text("from pkg import chat\nfrom pkg.data.collate import X\n")
    (pkg / "cli.py").write_text("import pkg.evaluate\nfrom pkg.errors import E\n")
    doc = """<!-- layers:start -->
```
cli: cli
commands (independent): evaluate chat
data: data
bottom: errors
```
<!-- layers:end -->"""
    found = violations(pkg, "pkg", read_layers(doc))
    assert found == [
        "errors imports cli: bottom may not import from cli",
        "evaluate imports chat: the commands do not import each other",
        "stray: in no layer of the map; add it to docs/architecture.md",
    ], found
