"""The import graph: contracts (spendstream/) <- producers/ and stream_processors/ <- gateway/ (on
producers/ only) <- entry points (spendstream/cli/), one way, with no circle; imports inside
functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("spendstream", "producers", "stream_processors", "gateway")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import mod` names the module)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def layer(module: str) -> str:
    if module.startswith("spendstream.cli") or module in ("spendstream.__main__", "spendstream._entry"):
        return "entry"
    return "contracts" if module.startswith("spendstream") else module.split(".")[0]


ALLOWED = {
    "contracts": {"contracts"},
    "producers": {"contracts", "producers"},
    "stream_processors": {"contracts", "stream_processors"},
    "gateway": {"contracts", "producers", "gateway"},
    "entry": {"contracts", "producers", "stream_processors", "gateway", "entry"},
}


def test_imports_go_one_way() -> None:
    wrong = sorted(
        f"{a} -> {b}"
        for a, targets in imports().items()
        for b in targets
        if layer(b) not in ALLOWED[layer(a)]
    )
    assert wrong == []


def test_there_is_no_import_circle() -> None:
    graph = imports()
    edges = graph
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert circles == []


def test_no_bench_script_shadows_a_package() -> None:
    """`python bench/x.py` puts bench/ first on sys.path: a bench/gateway.py would be imported in
    place of the gateway package by every bench (through spendstream.cli)."""
    scripts = {p.stem for p in (REPO / "bench").glob("*.py")}
    assert scripts.isdisjoint(PACKAGES), sorted(scripts & set(PACKAGES))
