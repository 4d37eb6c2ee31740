"""The house rules of issue 11, checked on the source: module and function sizes, imports at the top
(function-level imports only for optional dependencies), no import cycles inside ``harness``, ``__all__``
in every module.

    python -m pytest tests/test_house.py
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "harness"
MODULES = sorted(ROOT.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 60
# imports allowed inside functions: optional dependencies, loaded only when asked for
OPTIONAL = ("pynvml", "ray", "higher", "torchopt", "torch_maml", "torchvision", "PIL", "sklearn", "coverage")


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _waived(path: Path, lineno: int) -> bool:
    """A size limit may be exceeded when the first line of the body says why (``# long: ...``)."""
    lines = path.read_text().splitlines()
    return any("# long:" in line for line in lines[lineno - 1: lineno + 2])


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_is_short_enough_to_read_in_one_sitting(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES or _waived(path, 1), f"{_name(path)} has {n} lines (limit {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_functions_are_short(path: Path) -> None:
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and not _waived(path, node.lineno)]
    assert not long, f"{_name(path)}: {', '.join(long)}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_imports_inside_functions_are_only_optional_dependencies(path: Path) -> None:
    inner = []
    for fn in ast.walk(_tree(path)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            inner += [f"{m} (line {node.lineno})" for m in mods if m.split(".")[0] not in OPTIONAL]
    assert not inner, f"{_name(path)} imports inside functions: {', '.join(inner)}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_module_of_ours_is_imported_by_name_at_run_time(path: Path) -> None:
    """``importlib.import_module("harness....")`` / ``__import__`` is an import inside a function in disguise."""
    hidden = [f"{node.args[0].value} (line {node.lineno})" for node in ast.walk(_tree(path))
              if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.split(".")[0] == "harness"
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))]
    assert not hidden, f"{_name(path)} imports by name: {', '.join(hidden)}"


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__main__.py"], ids=_name)
def test_every_module_declares_its_public_names(path: Path) -> None:
    names = {t.id for node in _tree(path).body if isinstance(node, (ast.Assign, ast.AnnAssign))
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    assert "__all__" in names, f"{_name(path)} has no __all__"


def _top_level_harness_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in _tree(path).body:  # module level only: what runs at import time
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("harness"))
    return out


def import_graph() -> dict[str, set[str]]:
    known = {_name(p) for p in MODULES}
    return {_name(p): {m for m in _top_level_harness_imports(p) if m in known and m != _name(p)} for p in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_inside_harness() -> None:
    # a package's __init__ importing its own submodules is not a cycle of concepts
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in import_graph().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_command_imports_another_command() -> None:
    commands = {_name(p) for p in (ROOT / "cli").glob("*.py")} - {"harness.cli", "harness.cli.main", "harness.cli.args"}
    graph = import_graph()
    crossing = {c: sorted(graph[c] & commands) for c in commands if graph[c] & commands}
    assert not crossing, crossing


# The layers, top to bottom (docs/architecture.md): a package imports only from the layers below it, never
# from its own layer's other packages or from above.  ``harness`` (the public surface) sits on the engine.
LAYERS = (("__main__",), ("cli",), ("studies",), ("bench",), ("peers",), ("loop", "reporting"), ("settings",),
          ("zoo", "variants", "gradcheck"), ("harness",), ("core",))
RANK = {pkg: depth for depth, layer in enumerate(LAYERS) for pkg in layer}


def _package(module: str) -> str:
    """``harness.bench.store`` -> ``bench``; ``harness.settings`` -> ``settings``; ``harness`` -> ``harness``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "harness"


def imported_names(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` for every ``from harness... import name`` and ``import harness...`` at any level;
    ``from harness import peers`` counts as an import of the package ``harness.peers``."""
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harness":
            for a in node.names:
                sub = node.module == "harness" and (ROOT / a.name).is_dir()
                out.append((f"harness.{a.name}" if sub else node.module, "" if sub else a.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "harness"]
    return out


def layering_violations(edges: list[tuple[str, str, str, int]]) -> list[str]:
    """``(importer, module, name, line)`` edges -> the ones that run up or sideways, or take a private name
    from another package."""
    bad = []
    for importer, module, name, line in edges:
        src, dst = _package(importer), _package(module)
        if src == dst:
            continue
        if RANK[dst] <= RANK[src]:
            bad.append(f"{importer}:{line} imports {module} ({dst} is not below {src})")
        if name.startswith("_"):
            bad.append(f"{importer}:{line} takes the private name {name} from {module}")
    return bad


def test_the_layering_rule_finds_an_upward_a_sideways_and_a_private_import() -> None:
    edges = [("harness.reporting.compare", "harness.bench.cells", "Cell", 1),  # up
             ("harness.loop.train", "harness.reporting.files", "read_cells", 2),  # sideways
             ("harness.studies.seed", "harness.core.engine", "_inv_softplus", 3),  # private
             ("harness.cli.run", "harness.bench.single", "run_single", 4),  # fine
             ("harness.core.engine", "harness.core.state", "_private_within", 5)]  # fine: its own package
    assert [b.split(":")[1].split()[0] for b in layering_violations(edges)] == ["1", "2", "3"]


def test_every_package_imports_only_from_the_layers_below_it() -> None:
    assert set(RANK) >= {_package(_name(p)) for p in MODULES} | {"__main__"}, "a package without a layer"
    edges = [(_name(p) if p.name != "__main__.py" else "harness.__main__", module, name, line)
             for p in MODULES for module, name, line in imported_names(p)]
    bad = layering_violations(edges)
    assert not bad, "\n".join(bad)
