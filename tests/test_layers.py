"""The architecture as a fact: imports go one way down the layers, and the repository stands alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "preftune"

# Lowest first. A module may import its own layer's package and any layer below it, never one above;
# packages that share a position are listed in the order they may import each other.
LAYERS = ["errors", "digest", "data", "methods", "schedules", "config", "modeling", "rollout", "training", "evaluation",
          "annotate", "demo", "experiments", "trl", "cli"]


def _layer(module: str) -> str:
    """``preftune.training.loop`` → ``training``; ``preftune`` itself (the lazy exports) → ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cli"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``preftune`` module imported anywhere in the file (function bodies included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "preftune" else [f"preftune.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("preftune")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("preftune")]
    return found


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                if p.name != "__init__.py" and not p.name.startswith("__") and (p.suffix == ".py" or p.is_dir())}
    assert packages <= set(LAYERS), f"give these a place in LAYERS: {sorted(packages - set(LAYERS))}"


def test_imports_only_go_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "preftune":
            continue  # the lazy top-level exports load on attribute access only
        mine = LAYERS.index(_layer(module))
        for line, imported in _imports(path):
            theirs = _layer(imported) if imported != "preftune" else "cli"
            if LAYERS.index(theirs) > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({_layer(module)}) imports {imported} ({theirs})")
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_the_repository_stands_alone():
    """Code, tests and docs cite papers, never notes outside the repository."""
    outside = re.compile(r"\.\./shared|shared[/]reference|\b(methods|perf|online|trl|frameworks)\.md\b")
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py"),
             *ROOT.glob("*.md"), *ROOT.glob("benchmarks/*.md"), *ROOT.glob("experiments/**/*.md")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p != Path(__file__).resolve()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not hits, f"references to files outside the repository: {hits}"
