"""The shape of fedtune/: no import circles (lazy imports included) and one Flower boundary.

Every ``import`` in every module counts, at the top, inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency, and a circle of them still means two
modules that cannot be understood (or moved) one without the other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

FEDTUNE = Path(__file__).resolve().parents[1] / "fedtune"
# The rooms of fedtune/ (subpackages), each documented in its __init__.py.
ROOMS = ("averaging", "client", "data", "evaluation", "flower", "models", "objectives", "reporting", "server")


def module_name(path: Path) -> str:
    parts = path.relative_to(FEDTUNE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(FEDTUNE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> list[str]:
    """Every dotted name ``path`` imports (absolute, relative imports resolved), wherever the import is."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            out += [base, *(f"{base}.{a.name}" for a in node.names)]
    return out


def dependency_graph() -> dict[str, set[str]]:
    """fedtune module -> the fedtune modules it imports (the longest module prefix of each name)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        deps = set()
        for imported in imported_names(path, name):
            parts = imported.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    if candidate != name:
                        deps.add(candidate)
                    break
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_fedtune() -> None:
    cycle = find_cycle(dependency_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_circles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_lazy_and_type_checking_imports_count() -> None:
    names = imported_names(FEDTUNE / "config.py", "fedtune.config")
    assert "fedtune.strategy.strategy_problems" in names  # imported inside build_config


def test_only_fedtune_flower_imports_flwr() -> None:
    """Flower is one room's business: the apps, the strategy adapter, the codec and the simulation launcher.

    (``flwr_datasets``, a separate data library, is not Flower's runtime and may be used by the data room.)
    """
    outside = sorted(name for name, path in modules().items()
                     if not name.startswith("fedtune.flower")
                     and any(n == "flwr" or n.startswith("flwr.") for n in imported_names(path, name)))
    assert outside == []


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_says_what_lives_there(room: str) -> None:
    init = FEDTUNE / room / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert len(doc.split()) >= 20, f"fedtune/{room}/__init__.py needs a docstring: what lives there, what it may import"


def test_the_rooms_are_all_the_subpackages() -> None:
    found = sorted(p.parent.name for p in FEDTUNE.glob("*/__init__.py"))
    assert found == sorted(ROOMS)


def may_import(room: str) -> tuple[set[str], bool]:
    """What ``room``'s ``__init__`` says it may import: the fedtune modules named, and whether all core modules."""
    doc = ast.get_docstring(ast.parse((FEDTUNE / room / "__init__.py").read_text())) or ""
    paragraph = " ".join(doc.split("May import:", 1)[1].split("\n\n", 1)[0].split())
    allowed = paragraph.split(" Never ", 1)[0]
    return set(re.findall(r":mod:`(fedtune(?:\.\w+)+)`", allowed)), "the core modules" in allowed


def room_of(module: str) -> str:
    """``fedtune.client.runtime`` -> ``fedtune.client``; a core module is its own room."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in ROOMS else module


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_what_its_docstring_allows(room: str) -> None:
    named, all_core = may_import(room)
    graph = dependency_graph()
    here = f"fedtune.{room}"
    broken = sorted(f"{module} imports {dep}" for module, deps in graph.items() if room_of(module) == here
                    for dep in deps if room_of(dep) not in {here, "fedtune", *named}
                    and not (all_core and room_of(dep).split(".")[1] not in ROOMS))
    assert not broken, f"fedtune/{room}/__init__.py's 'May import' does not allow: {broken}"


def test_the_room_rule_reads_the_docstrings() -> None:
    named, all_core = may_import("models")
    assert named == {"fedtune.schema", "fedtune.errors"} and not all_core
    assert may_import("server")[1] and "fedtune.client" not in may_import("server")[0]
    assert room_of("fedtune.client.runtime") == "fedtune.client" and room_of("fedtune.schema") == "fedtune.schema"
