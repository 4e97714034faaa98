"""The layout holds (README "Layout"): product code never imports the tooling, unit tests never import
the emulator, first-party modules import each other without a loop, and template.yaml declares what
goes in each layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sif_tools import package as pkg

REPO = Path(__file__).resolve().parents[2]
PRODUCT = {  # what is deployed: the functions, the GPU worker, the layers, the shared core
    "sif_api": "functions/api/sif_api",
    "sif_authorizer": "functions/authorizer/sif_authorizer",
    "sif_scorer": "functions/scorer/sif_scorer",
    "sif_worker": "functions/worker/sif_worker",
    "sif_callbacks": "functions/callbacks/sif_callbacks",
    "sif_gpu_worker": "functions/gpu_worker/sif_gpu_worker",
    "sif_inference": "layers/inference/python/sif_inference",
    "sif_metering": "layers/metering/python/sif_metering",
    "sif_core": "shared/sif_core",
}
TOOLING = {  # what runs on a developer's machine only
    "sif_emulator": "infra/local/sif_emulator",
    "sif_cli": "infra/local/sif_cli",
    "sif_tools": "infra/tools/sif_tools",
    "sif_modelbuild": "infra/tools/sif_modelbuild",
    "sif_bench": "infra/bench/sif_bench",
}
PACKAGES = {**PRODUCT, **TOOLING}


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The modules a file imports (`from a import b` counts as `a.b` too), outside TYPE_CHECKING blocks."""
    found: set[str] = set()

    def visit(node: ast.AST, depth: int) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            is_scope = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if not (top_level_only and is_scope):
                visit(child, depth + 1)

    visit(ast.parse(path.read_text()), 0)
    return found


def modules() -> dict[str, Path]:
    """Every first-party module by dotted name."""
    found: dict[str, Path] = {}
    for name, folder in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            dotted = ".".join((name, *parts)).removesuffix(".__init__")
            found[dotted] = path
    return found


def test_every_first_party_package_is_named_here_and_installed_from_its_folder() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    for name, folder in PACKAGES.items():
        assert (REPO / folder / "__init__.py").is_file(), name
        assert f'{name} = "{folder}"' in pyproject, f"pyproject.toml's package-dir does not map {name} to {folder}"


def test_product_code_never_imports_the_tooling() -> None:
    offenders = {
        f"{path.relative_to(REPO)} imports {module}"
        for dotted, path in modules().items()
        if dotted.split(".")[0] in PRODUCT
        for module in imports(path)
        if module.split(".")[0] in TOOLING
    }
    assert not offenders, sorted(offenders)


def test_unit_tests_import_no_emulator_code() -> None:
    files = [*sorted((REPO / "tests" / "unit").glob("*.py")), REPO / "tests" / "conftest.py"]
    offenders = set()
    for path in files:
        # the shared conftest imports the emulator inside the fixtures that start it, never at the top
        found = imports(path, top_level_only=path.name == "conftest.py")
        offenders |= {f"{path.relative_to(REPO)} imports {m}" for m in found if m.split(".")[0] == "sif_emulator"}
    assert not offenders, sorted(offenders)
    # and nothing they import pulls the emulator in at import time
    graph = import_graph(top_level_only=True)
    reach: set[str] = set()
    todo = [m for path in files for m in imports(path, top_level_only=True) if m in graph]
    while todo:
        module = todo.pop()
        if module not in reach:
            reach.add(module)
            todo += [m for m in graph[module] if m in graph]
    assert not {m for m in reach if m.startswith("sif_emulator")}, sorted(reach)


def import_graph(*, top_level_only: bool) -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for dotted, path in known.items():
        targets = {m for m in imports(path, top_level_only=top_level_only) if m in known and m != dotted}
        parent = dotted.rsplit(".", 1)[0]
        graph[dotted] = {t for t in targets if t != parent or path.name != "__init__.py"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops of `graph` (one path per strongly connected component that has a loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_cycles_finds_a_loop_and_only_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at import", "including imports inside functions"])
def test_no_import_loops(top_level_only: bool) -> None:
    assert not cycles(import_graph(top_level_only=top_level_only))


def test_template_declares_what_goes_in_each_layer() -> None:
    requirements, sources = pkg.declared_layers(REPO / "template.yaml")
    assert list(requirements) == ["runtime-base", "runtime-ml"]  # the split fills them in this order
    assert sources == {
        "inference": ("layers/inference/python/sif_inference",),
        "core": ("shared/sif_core",),
        "metering": ("layers/metering/python/sif_metering",),
    }
    for rel in [*requirements.values(), *(f for folders in sources.values() for f in folders)]:
        assert (REPO / rel).exists(), rel
    # every first-party package a function's layers carry is product code
    assert {Path(f).name for folders in sources.values() for f in folders} <= set(PRODUCT)
