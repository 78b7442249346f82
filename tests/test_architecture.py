"""The import graph of the package has no circles (imports inside functions count too): a
lower module never reaches back up. Walks the AST, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import portfolio

ROOT = Path(portfolio.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """module -> the portfolio modules it imports (module-level and in-function)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = ("portfolio",) + path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts).removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "portfolio"):
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    assert len(graph) > 50 and "portfolio.registry.registry" in graph["portfolio.cli._base"] | {
        t for m in graph if m.startswith("portfolio.cli") for t in graph[m]}
    assert circles(graph) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Layers, lowest first; a module belongs to the longest prefix that names it. An import may
# point down or sideways, never up, except for the arrows in UPWARD (docs/architecture.md,
# "Import layering", says why each is there).
LAYERS = [
    ("foundation", ["portfolio.errors", "portfolio.store", "portfolio.data", "portfolio.policy", "portfolio.routing",
                    "portfolio.adapter_files", "portfolio.basemodel", "portfolio.webhook_http", "portfolio.web_guard"]),
    ("registry", ["portfolio.registry"]),
    ("models", ["portfolio.runtime", "portfolio.mixed_batch", "portfolio.convert", "portfolio.modeling", "portfolio.serving", "portfolio.compose", "portfolio.model_card",
                "portfolio.export", "portfolio.gguf_lora", "portfolio.lineage_format"]),
    ("workflows", ["portfolio.evaluation", "portfolio.suites", "portfolio.training", "portfolio.engines"]),
    ("services", ["portfolio.scheduler", "portfolio.server", "portfolio.ui"]),
    ("entry points", ["portfolio.cli", "portfolio.__main__", "portfolio"]),
]
UPWARD = {
    ("portfolio.registry.suites", "portfolio.suites.cases"),
}


def layer_of(module: str) -> int:
    """The index in `LAYERS` of the layer ``module`` belongs to."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{module} is in no layer of LAYERS; add it"
    return best[0]


def upward_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports from a module to one in a higher layer."""
    return {(m, t) for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m)}


def test_imports_point_down_except_the_named_arrows():
    arrows = upward_arrows(import_graph())
    assert arrows == UPWARD, f"new upward imports: {sorted(arrows - UPWARD)}; gone: {sorted(UPWARD - arrows)}"
    assert len(UPWARD) <= 3
