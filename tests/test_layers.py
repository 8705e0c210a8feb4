"""The package layers one way: cli -> workflows and the API -> what a run shares -> stages -> foundations.

The parts are the package's top-level modules and subpackages; an import anywhere in a part's files
(inside functions too) is an edge from that part to the part it names. No part may import from a layer
above its own, and the import graph of the parts has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "onnxprune"

LAYERS = [
    {"errors", "version", "workdir", "io", "runtime", "shapes", "vetting", "progress", "ops", "graph", "plan", "cluster", "workers"},  # foundations
    {"calib", "scoring", "allocate", "budget", "rewrite", "lowrank", "sparsity", "quantize", "recover", "validate", "report"},  # stages
    {"config", "loading", "baseline", "stages", "speed"},  # what a run of the stages shares
    {"pipeline", "workflows", "sweep", "limits", "onnxprune"},  # workflows, and the API the package root exports
    {"cli"},
]


def parts() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | \
        {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


def part_of(module: str) -> str:
    """'onnxprune.scoring.pfp' -> 'scoring'; the package itself -> 'onnxprune'."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of the onnxprune modules that `source`, a module of `package`, imports anywhere
    (`from X import y` counts as X.y when y is a module of the package, else as X)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / name.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
                found.add(name if is_module else base)
    return {m for m in found if m == "onnxprune" or m.startswith("onnxprune.")}


def import_graph() -> dict[str, set[str]]:
    """Part -> the other parts it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        source = "onnxprune" if relative == Path("__init__.py") else relative.parts[0].removesuffix(".py")
        package = ".".join(("onnxprune", *relative.parent.parts))
        edges = graph.setdefault(source, set())
        edges.update(part_of(m) for m in imported_modules(path.read_text(), package))
        edges.discard(source)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one part (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_part_has_a_layer():
    layered = set().union(*LAYERS)
    assert parts() | {"onnxprune"} == layered, "add new modules to a layer in LAYERS"


def test_no_part_imports_from_a_layer_above():
    layer = {part: i for i, members in enumerate(LAYERS) for part in members}
    upward = sorted(f"{source} -> {target}" for source, targets in import_graph().items() for target in targets
                    if layer[target] > layer[source])
    assert upward == []


def test_the_import_graph_of_the_parts_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_a_cycle_and_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = "def run():\n    from ..calib import capture\n    from ..errors import UsageError\n"
    assert imported_modules(source, "onnxprune.scoring") == {"onnxprune.calib.capture", "onnxprune.errors"}


def test_importing_the_library_leaves_onnxruntime_logging_alone():
    code = ("import onnxruntime, pkgutil, importlib\n"
            "calls = []\n"
            "onnxruntime.set_default_logger_severity = lambda level: calls.append(level)\n"
            "import onnxprune\n"
            "for m in pkgutil.walk_packages(onnxprune.__path__, 'onnxprune.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert calls == [], calls\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
