"""The shape of the library itself: its imports run down the floors of docs/design.md and never in a
circle, and no function is longer than a reader can hold in view."""
from __future__ import annotations

import ast
from pathlib import Path

import lte

ROOT = Path(lte.__file__).parent

# Bottom to top; a module may import from its own floor's folders or lower ones only.
FLOORS = [
    {"lte.errors", "lte.imports", "lte.faults"},
    {"lte.memory"},
    {"lte.core"},
    {"lte.models", "lte.data"},
    {"lte.runtime"},
    {"lte.single"},
    {"lte.distributed"},
    {"lte.train", "lte.sample", "lte.export", "lte"},
]
LONGEST_FUNCTION = 60  # lines


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def imports(name: str, path: Path, package: bool, known: dict) -> set[str]:
    """The lte modules `name` imports, wherever in the file (function-level imports included). A
    `from X import y` of a submodule y depends on X.y, not on X's own code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known]
            targets = submodules if len(submodules) == len(node.names) else [source, *submodules]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, package, known) for name, (path, package) in known.items()}


def floor_of(module: str) -> int:
    folder = ".".join(module.split(".")[:2])
    return next(i for i, floor in enumerate(FLOORS) if folder in floor)


def test_no_import_runs_up_a_floor():
    upward = sorted(f"{m} imports {d}" for m, deps in graph().items() for d in deps
                    if d != "lte" and floor_of(d) > floor_of(m))
    assert not upward, upward


def test_no_import_circle():
    edges, cycles = graph(), []
    # strongly connected components (Tarjan); any with more than one module is a circle
    index, low, stack, on = {}, {}, [], set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_every_folder_has_a_floor():
    assert all(floor_of(m) >= 0 for m in modules())


def test_no_function_is_longer_than_a_screen():
    long = []
    for path, _ in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long
