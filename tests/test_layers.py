"""The architecture as a fact: imports go one way down the layers, without cycles and never by string; training and
evaluation are peers; the training code reads in short functions; and the repository stands alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "preftune"

# Lowest first. A module may import its own layer's package and any layer below it, never one above;
# packages that share a position are listed in the order they may import each other, unless they are PEERS.
LAYERS = ["metric_names", "errors", "digest", "data", "methods", "health", "schedules", "config", "modeling", "rollout",
          "training", "evaluation", "annotate", "demo", "experiments", "trl", "cli"]
# Layers that share a position and import neither the other: what both need lives below them.
PEERS = [("training", "evaluation")]
LONGEST_TRAINING_FUNCTION = 60  # lines, docstring included


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


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__.py``)."""
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted(PACKAGE.rglob("*.py"))}


def _import_graph() -> dict[str, dict[str, int]]:
    """Module → {imported module: line}, every import of the file included (function bodies too, as
    :func:`_imports`); ``from preftune.x import y`` counts as importing the module ``preftune.x.y`` when there is one,
    else ``preftune.x`` (a package's ``__init__`` then). ``preftune`` itself imports nothing: its lazy exports load on
    attribute access only."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        if module == "preftune":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name in modules and name != module:
                    edges.setdefault(name, node.lineno)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan's algorithm), from the
    component's first module back to it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_shortest_cycle(graph, component[0], set(component)) for component in sorted(components)]


def _shortest_cycle(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """``[start, …, start]`` through ``members``, breadth first until an import leads back to ``start``."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while start not in came_from:
        reached = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in members and w not in came_from:
                    came_from[w] = v
                    reached.append(w)
        frontier = reached
    back = [came_from[start]]  # the modules before start, last first
    while back[-1] != start:
        back.append(came_from[back[-1]])
    return [*reversed(back), start]


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


def test_training_and_evaluation_import_neither_the_other():
    crossing = []
    for module, edges in _import_graph().items():
        for imported, line in edges.items():
            if (_layer(module), _layer(imported)) in PEERS or (_layer(imported), _layer(module)) in PEERS:
                crossing.append(f"{_modules()[module].relative_to(ROOT)}:{line} ({_layer(module)}) imports {imported}")
    assert not crossing, "peers that import each other (move what both need below them):\n" + "\n".join(crossing)


def test_no_import_cycles():
    """Function-body imports count: a cycle that only a deferred import breaks is still two modules that need each
    other. One cycle is shown per tangle, each module with the line of its import of the next."""
    graph = _import_graph()
    cycles = [" → ".join(f"{a}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:])) + f" → {cycle[-1]}"
              for cycle in _cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _builds_preftune_name(node: ast.expr) -> bool:
    """A string literal, f-string, concatenation or format whose text starts with ``preftune``."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.startswith("preftune")
    if isinstance(node, ast.JoinedStr):
        return bool(node.values) and _builds_preftune_name(node.values[0])
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _builds_preftune_name(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _builds_preftune_name(node.func.value)
    return False


def test_no_preftune_module_is_imported_by_string():
    """``import_module("preftune.x")`` hides an import from every check above; an import statement says it (a
    function-body import where it must wait). Third-party modules by name (optional optimizers, a user's judge) are
    fine. The lazy top-level exports (``preftune/__init__.py``) read their table of names, not a literal."""
    found = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            argument = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if name in ("import_module", "__import__") and argument is not None and _builds_preftune_name(argument):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "preftune modules imported by string:\n" + "\n".join(found)


def test_training_functions_are_short():
    """A function of the training code fits on a screen: the loop reads top to bottom and calls helpers."""
    long = []
    for path in sorted((PACKAGE / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_TRAINING_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions longer than {LONGEST_TRAINING_FUNCTION} lines:\n" + "\n".join(long)
