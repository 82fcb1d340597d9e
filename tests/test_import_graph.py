"""The import graph of ptmig/ has no cycle through ptmig.machine.

The graph is built from the source with `ast`, function-local imports included (a cycle hidden
inside a function still ties the modules together), so the test needs no import side effects.
Type-only imports (TYPE_CHECKING blocks) count too. `machine` composes the VM, its devices,
shadowing and migration; the packages it composes reach it only through the narrow interfaces
in `ptmig.vmparts`, never by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ptmig

ROOT = Path(ptmig.__file__).parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The ptmig modules `path` imports anywhere in its body: inside functions and in
    TYPE_CHECKING blocks too (a type named in a signature is a dependency like any other)."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {_known(a.name, modules) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else _known(target, modules))
    out.discard("")
    out.discard(module)
    return out


def _known(name: str, modules: set[str]) -> str:
    """The longest ptmig module that `name` names (a package for an attribute of it)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return ""


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports_of(p, root, modules) for p in paths}


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest import path from `start` back to itself, or None."""
    frontier = [[start]]
    seen = {start}
    while frontier:
        nxt = []
        for path in frontier:
            for dep in sorted(graph.get(path[-1], ())):
                if dep == start:
                    return path + [start]
                if dep not in seen:
                    seen.add(dep)
                    nxt.append(path + [dep])
        frontier = nxt
    return None


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A throw-away `ptmig` package of `files` (path -> source), each directory a package."""
    pkg = tmp_path / "ptmig"
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    return pkg


def test_the_graph_sees_function_local_imports(tmp_path: Path) -> None:
    pkg = package(
        tmp_path,
        {
            "machine.py": "from .sub import a\n",
            "sub/a.py": "def f():\n    from ..machine import Machine\n",
        },
    )
    assert cycle_through(import_graph(pkg), "ptmig.machine") == [
        "ptmig.machine",
        "ptmig.sub.a",
        "ptmig.machine",
    ]


def test_type_checking_imports_count(tmp_path: Path) -> None:
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .machine import M\n"
    pkg = package(tmp_path, {"machine.py": "from . import a\n", "a.py": guarded})
    assert cycle_through(import_graph(pkg), "ptmig.machine") == [
        "ptmig.machine",
        "ptmig.a",
        "ptmig.machine",
    ]


def test_a_graph_without_a_way_back_has_no_cycle(tmp_path: Path) -> None:
    pkg = package(
        tmp_path,
        {
            "machine.py": "from . import a\nfrom .a import b\n",
            "a.py": "import ptmig.c\n",
            "c.py": "",
        },
    )
    assert cycle_through(import_graph(pkg), "ptmig.machine") is None


def test_no_import_cycle_goes_through_machine() -> None:
    graph = import_graph()
    assert "ptmig.machine" in graph and graph["ptmig.machine"]
    cycle = cycle_through(graph, "ptmig.machine")
    assert cycle is None, "import cycle through ptmig.machine: " + " -> ".join(cycle or [])


FRONT_ENDS = (
    "ptmig.cli",
    "ptmig.migrate",
    "ptmig.load",
    "ptmig.demo",
    "ptmig.bench",
    "ptmig.report",
)
CORE = ("ptmig.vm", "ptmig.memory", "ptmig.dirty", "ptmig.iommu", "ptmig.layout", "ptmig.bitmap")
ABOVE_CORE = ("ptmig.machine", "ptmig.migration", "ptmig.shadow", "ptmig.devices", "ptmig.net")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the README's map: the VMM never imports a front end, devices never
    import migration, shadowing never imports migration, the core imports nothing above it."""
    rules = [
        (lambda m: not _in(m, FRONT_ENDS) and m != "ptmig.__main__", FRONT_ENDS),
        (lambda m: _in(m, ("ptmig.devices",)), ("ptmig.migration", "ptmig.machine")),
        (lambda m: _in(m, ("ptmig.shadow",)), ("ptmig.migration", "ptmig.machine")),
        (lambda m: _in(m, CORE + ("ptmig.kvm", "ptmig.qmp")), ABOVE_CORE),
    ]
    return [
        f"{module} imports {dep}"
        for module, deps in sorted(graph.items())
        for applies, forbidden in rules
        if applies(module)
        for dep in sorted(deps)
        if _in(dep, forbidden)
    ]


def test_a_layer_violation_is_reported() -> None:
    graph = {"ptmig.devices.x": {"ptmig.migration.source"}, "ptmig.vm": {"ptmig.layout"}}
    assert layer_violations(graph) == ["ptmig.devices.x imports ptmig.migration.source"]


def test_the_packages_import_downward() -> None:
    assert layer_violations(import_graph()) == []
