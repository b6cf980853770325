"""The package's shape, computed from its code: no import circles, imports only go down the
layers of docs/architecture.md, sources and formats do not import each other, and the page
names every module.

The graph holds every import that runs (at module level or inside a function), read with
``ast`` from the files of the ``weightlift`` package under test; imports under
``if TYPE_CHECKING:`` never run and are left out. ``from .x import y`` is an edge to the module
``x.y`` when that is a module, else to ``x``; as in import-linter, importing ``a.b`` is no edge to
the package ``a`` itself (Python initialises it first either way).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import weightlift

PACKAGE = Path(weightlift.__file__).parent
DOC = Path(__file__).parent.parent / "docs" / "architecture.md"

#: Bottom to top: a module may import modules of its own layer or of layers below it, never one
#: above. A module belongs to the layer of the longest prefix that names it ("" is the package's
#: ``__init__``). docs/architecture.md shows the same table.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("errors", "units", "probes", "budget", "report", "computed", "io.retry"),
    "formats": ("formats", "dequant"),
    "storage": ("remote",),
    "sources": ("sources",),
    "plan": ("plan", "slicing", "advanced"),
    "engines": ("io",),
    "place": ("place", "read", "verify"),
    "api": ("api",),
    "integrations": ("load_into", "gguf_families", "compat", "torch", "numpy", "transformers",
                     "diffusers",
                     "distributed", "vllm"),
    "edge": ("cli", "bench", "__main__", ""),
}
ORDER = list(LAYERS)


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name → (file, is a package ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


MODULES = modules()


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of every node under an ``if TYPE_CHECKING:`` block."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _owner(dotted: str) -> str:
    """The module that ``dotted`` (a module, or a name inside one) lives in."""
    while dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _imported(name: str) -> Iterator[str]:
    path, is_package = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped = _type_checking_only(tree)
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "weightlift":
                    yield _owner(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "weightlift":
                continue
            for alias in node.names:
                target = f"{module}.{alias.name}"
                yield target if target in MODULES else _owner(module)


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports at run time."""
    return {name: set(_imported(name)) - {name} for name in MODULES}


GRAPH = import_graph()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """0 for a module that imports none of the package, else 1 + the highest it imports."""
    level: dict[str, int] = {}

    def of(name: str) -> int:
        if name not in level:
            level[name] = 1 + max((of(n) for n in graph[name]), default=-1)
        return level[name]

    for name in graph:
        of(name)
    return level


def layer(name: str) -> str | None:
    """The layer of module ``name``, None when no prefix names it."""
    relative = name.removeprefix("weightlift").removeprefix(".")
    best: tuple[int, str] | None = None
    for layer_name, prefixes in LAYERS.items():
        for prefix in prefixes:
            if relative == prefix or (prefix and relative.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), layer_name)
    return None if best is None else best[1]


def test_the_graph_sees_imports_inside_functions() -> None:
    # sources imports the object-storage source only when a URL is resolved.
    assert "weightlift.sources.remote" in GRAPH["weightlift.sources"]
    # load_into reaches the read path through ``from . import api``.
    assert "weightlift.api" in GRAPH["weightlift.load_into"]
    # A TYPE_CHECKING import does not run: formats.records names GGMLType only in annotations.
    assert "weightlift.formats.ggml" not in GRAPH["weightlift.formats.records"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    found = cycles(GRAPH)
    assert found == [], "import circles: " + "; ".join(" ↔ ".join(c) for c in found)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer() -> None:
    lost = sorted(name for name in MODULES if layer(name) is None)
    assert lost == [], (f"{', '.join(lost)}: add each to a layer in LAYERS here and to the module "
                        "list of docs/architecture.md")


def test_imports_only_go_down_the_layers() -> None:
    upward = []
    for name, imported in sorted(GRAPH.items()):
        here = ORDER.index(layer(name) or "edge")
        for target in sorted(imported):
            there = ORDER.index(layer(target) or "edge")
            if there > here:
                upward.append(f"{name} ({ORDER[here]}) imports {target} ({ORDER[there]})")
    assert upward == [], "imports up the layers:\n" + "\n".join(upward)


def test_nothing_below_the_api_imports_it() -> None:
    below = {name for name in MODULES if ORDER.index(layer(name) or "edge") < ORDER.index("api")}
    assert {"weightlift.sources", "weightlift.formats", "weightlift.read"} <= below
    reaching = sorted(name for name in below if GRAPH[name] & {"weightlift.api"})
    assert reaching == []


@pytest.mark.parametrize("package, members", [
    ("weightlift.sources", ("local", "hub", "remote")),
    ("weightlift.formats", ("safetensors", "gguf")),
])
def test_sources_and_formats_do_not_import_each_other(package: str, members: tuple[str, ...]
                                                      ) -> None:
    names = {f"{package}.{m}" for m in members}
    assert names <= set(MODULES)
    crossing = sorted(f"{a} imports {b}" for a in names for b in GRAPH[a] & names)
    assert crossing == []


def test_the_architecture_page_names_every_module() -> None:
    text = DOC.read_text(encoding="utf-8")
    absent = []
    for name, (path, _) in sorted(MODULES.items()):
        relative = path.relative_to(PACKAGE).as_posix()
        shown = relative.removesuffix("/__init__.py") + "/" if relative.endswith(
            "/__init__.py") else relative
        if relative != "__init__.py" and f"`{shown}`" not in text:
            absent.append(shown)
    assert absent == [], f"docs/architecture.md does not name {', '.join(absent)}"


if __name__ == "__main__":  # the graph as text: python tests/test_architecture.py
    level = levels(GRAPH) if not cycles(GRAPH) else {}
    for name in sorted(GRAPH, key=lambda n: (level.get(n, 0), n)):
        print(f"{level.get(name, '?'):>2} {layer(name) or '?':<12} {name:<34} "
              f"{' '.join(sorted(n.removeprefix('weightlift.') for n in GRAPH[name]))}")
    edges = sum(len(targets) for targets in GRAPH.values())
    print(f"{len(GRAPH)} modules, {edges} imports, {max(level.values(), default=0) + 1} levels, "
          f"cycles: {cycles(GRAPH)}")
