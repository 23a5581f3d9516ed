"""The house as a test (ARCHITECTURE.md "Layout"): a module imports only from its own layer or below, there is
no import cycle, and bench/ never imports tests/. Imports inside functions count: they are dependencies too.
Read with ast only; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cybertron"

# Lowest first. A key names a top-level module or package of cybertron (everything below it belongs to it).
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "errors", "config", "files"),  # ground
    ("models", "data"),  # pure: no torch.distributed (test_import_rules.py)
    ("train",),
    ("parallel",),
    ("plan",),  # the layout planner: model shapes and parallel/'s validators, no process group
    ("serve",),  # takes a built model: nothing above parallel/
    ("finetune", "pretrain", "eval"),  # the methods; eval/ scores a built model (and uses the serving engine)
    ("align",),
    ("runs", "hf_runs"),  # the run-directory format and loading a run
    ("dashboard",),  # reads run directories as files (no torch); serves a page
    ("commands", "cli", "__main__"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    return ".".join(("cybertron", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The cybertron modules `module` imports anywhere in its file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
        else:
            continue
        for name in names:
            while name and name not in known:  # `import cybertron.x.y` depends on cybertron.x.y
                name = name.rpartition(".")[0]
            if name.startswith("cybertron") and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imported(m, p, known) for m, p in mods.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    assert key in LAYER_OF, f"{module} is in no layer: add cybertron/{key} to LAYERS (and to ARCHITECTURE.md)"
    return LAYER_OF[key]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unplaced = sorted({m.split(".")[1] for m in modules() if "." in m} - set(LAYER_OF))
    assert unplaced == [], f"modules in no layer of the table: {unplaced}"


def test_no_upward_imports():
    graph = import_graph()
    upward = sorted(f"{m} (layer {layer(m)}) -> {n} (layer {layer(n)})"
                    for m, deps in graph.items() for n in deps if layer(n) > layer(m))
    assert upward == [], "upward imports:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_libraries_define_no_command_main():
    def defines_main(path: Path) -> bool:
        return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)

    offenders = sorted(m for m, p in modules().items() if layer(m) < LAYER_OF["commands"] and defines_main(p))
    assert offenders == [], f"a library module defines main (commands live in cybertron/commands/): {offenders}"


def test_commands_do_not_import_each_other():
    graph = import_graph()
    edges = sorted(f"{m} -> {n}" for m, deps in graph.items() if m.startswith("cybertron.commands.")
                   for n in deps if n.startswith("cybertron.commands."))
    assert edges == [], "commands import each other:\n  " + "\n  ".join(edges)


def test_bench_never_imports_tests():
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert offenders == [], f"bench/ imports tests/: {offenders}"


def test_the_checker_sees_an_upward_import_and_a_cycle():
    """The rules above could pass by seeing nothing: check them on a graph with one of each."""
    graph = {"cybertron.train.a": {"cybertron.finetune.b"}, "cybertron.finetune.b": {"cybertron.train.a"},
             "cybertron.models.c": set()}
    assert cycles(graph) == [["cybertron.finetune.b", "cybertron.train.a"]]
    assert layer("cybertron.train.a") < layer("cybertron.finetune.b")
    real = import_graph()
    assert "cybertron.train.session" in real["cybertron.pretrain"]  # a plain import is seen
    assert "cybertron.finetune.quant" in real["cybertron.finetune.model"]
