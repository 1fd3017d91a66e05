"""The package's shape, checked: no import cycles, no module over 500 lines, no function over 80.

Exceptions are listed by name with the issue that removes them; the lists may only shrink (a stale entry
fails too, so an entry is dropped as soon as its issue lands).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_gpumem"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

#: "module:function" -> the issue that shortens it.
LONG_FUNCTIONS: dict[str, str] = {}  # the last two (_estimate's _leaves, _replay_paused) went with issue 14
#: Import cycles that exist only through imports inside functions (deferred, so importing works), by the
#: sorted modules of the cycle -> the issue that removes them. Cycles through module-level imports: none allowed.
DEFERRED_CYCLES: dict[tuple[str, ...], str] = {}  # the results <-> tables cycle went with issue 12


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path], *, top_level_only: bool) -> set[str]:
    """The package modules ``name`` imports (relative imports resolved; ``from pkg import mod`` counts mod)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # module level includes if/try blocks; imports under TYPE_CHECKING never run
    statements = [s for s in tree.body if not _is_type_checking(s)
                  and not (top_level_only and isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    nodes = [n for s in statements for n in ast.walk(s)]
    targets = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    return {t for t in targets if t in modules and t != name}


def _is_type_checking(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each as sorted module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(tuple(sorted(component)))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(name, path, modules, top_level_only=top_level_only) for name, path in modules.items()}
    # a package's __init__ re-exporting its own modules is not a cycle with them
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def test_no_import_cycles_through_module_level_imports():
    assert _cycles(_graph(top_level_only=True)) == []


def test_deferred_import_cycles_are_only_the_listed_ones():
    assert {c: DEFERRED_CYCLES.get(c, "NOT ALLOWED") for c in _cycles(_graph(top_level_only=False))} == DEFERRED_CYCLES


def test_no_module_over_500_lines():
    sizes = {name: path.read_text().count("\n") for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_over_80_lines_outside_the_allow_list():
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{name}:{node.name}"] = length
    assert set(long) == set(LONG_FUNCTIONS), (
        f"functions over {MAX_FUNCTION_LINES} lines: {long}; allowed (shrinking): {LONG_FUNCTIONS}")


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_reachable_finds_imports_of_imports():
    assert _reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


def test_the_estimate_never_imports_the_emulation():
    """Issue 14: the estimate reads the CUDA facts (``_cuda_facts``) but runs none of the emulated backend's code,
    so a wrong emulation shows as a contradiction instead of agreeing with itself. Imports inside functions
    count, and so do imports of imports; ``_cuda_facts`` may not import the emulation either."""
    graph = _graph(top_level_only=False)
    offending = {}
    for name in graph:
        if name.startswith(("pytest_gpumem._estimate", "pytest_gpumem._cuda_facts")):
            bad = sorted(m for m in _reachable(graph, name) if m.startswith("pytest_gpumem._emulation"))
            if bad:
                offending[name] = bad
    assert offending == {}
