"""Dependencies run one way: an AST walk of every module of the package, ``convert/``, ``bench/`` and
``scripts/`` finds the imports between the package's parts, and fails on a cycle between parts, on a
part below the apps importing ``apps/``, and on anything but the tests importing ``tests/``.

A part is a subpackage (``cfgbasin_jax.models``, ``cfgbasin_jax.convert``, ...) or a top-level module
(``cfgbasin_jax.pipeline``); imports inside one part are free. Function-level (lazy) imports count
too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cfgbasin_jax"
# The layers from the bottom up, as the README's "Architecture" section states them. A part may import
# the parts of lower layers (or its own layer's, where no cycle results), never those of a higher one.
LAYERS = [
    ("runtime", "schedulers"),
    ("models", "method"),
    ("convert", "metrics"),
    ("loading",),
    ("pipeline",),
    ("baselines",),
    ("runs", "toy"),
    ("training",),
    ("apps",),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "convert":  # installed as cfgbasin_jax.convert
        parts = [PACKAGE, *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str | None:
    """'cfgbasin_jax.models.unet' -> 'models'; 'bench.jobs' -> 'bench'; the package root -> None."""
    pieces = module.split(".")
    if pieces[0] == PACKAGE:
        return pieces[1] if len(pieces) > 1 else None
    return pieces[0] if pieces[0] in ("bench", "tests", "scripts") else None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def part_graph() -> dict[str, dict[str, set[str]]]:
    """{part: {imported part: {importing module, ...}}} over the package, convert/, bench/, scripts/."""
    files = [p for d in (PACKAGE, "convert", "bench", "scripts") for p in (ROOT / d).rglob("*.py")]
    graph: dict[str, dict[str, set[str]]] = {}
    for path in files:
        module = module_name(path)
        source = part_of(module)
        if source is None:
            continue
        for target_module in imported_modules(path, module):
            target = part_of(target_module)
            if target is not None and target != source:
                graph.setdefault(source, {}).setdefault(target, set()).add(module)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` ({node: {successor}}) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_graph_sees_a_planted_import(tmp_path, monkeypatch):
    """The walk itself: a lazy import inside a function of a planted module makes an edge."""
    pkg = tmp_path / PACKAGE / "models"
    pkg.mkdir(parents=True)
    (pkg / "planted.py").write_text("def f():\n    from cfgbasin_jax.runs import folder\n", encoding="utf-8")
    (tmp_path / PACKAGE / "runs").mkdir()
    (tmp_path / PACKAGE / "runs" / "x.py").write_text("from ..models import planted\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = part_graph()
    assert "runs" in graph["models"] and "models" in graph["runs"]
    assert find_cycle({k: set(v) for k, v in graph.items()}) is not None


def test_no_cycle_between_parts():
    graph = part_graph()
    cycle = find_cycle({part: set(targets) for part, targets in graph.items()})
    if cycle:
        links = [f"{a} -> {b} (in {', '.join(sorted(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle between parts: " + "; ".join(links))


def test_layers_run_one_way():
    """Every import goes to a part of the same or a lower layer (LAYERS); apps and tests are imported
    by nothing below them."""
    rank = {part: i for i, layer in enumerate(LAYERS) for part in layer}
    graph = part_graph()
    bad = []
    for source, targets in graph.items():
        for target, modules in targets.items():
            if target == "tests" and source != "tests":
                bad.append(f"{', '.join(sorted(modules))} imports tests/")
            elif target == "apps" and source not in ("scripts",):
                bad.append(f"{', '.join(sorted(modules))} imports apps/")
            elif source in rank and target in rank and rank[target] > rank[source]:
                bad.append(f"{', '.join(sorted(modules))} ({source}) imports {target}, a higher layer")
    assert not bad, "\n".join(bad)


def test_every_part_has_a_layer():
    parts = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    parts |= {p.stem for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__"}
    parts.add("convert")
    layered = {part for layer in LAYERS for part in layer}
    assert parts == layered, f"parts without a layer: {sorted(parts - layered)}; layers naming no part: {sorted(layered - parts)}"


def test_readme_states_the_layers():
    """The README's "Architecture" section states LAYERS, bottom up ("a, b < c < ...")."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = text[text.index("## Architecture"):].split("```")[1].strip()
    stated = [{part.strip() for part in layer.split(",")} for layer in line.split("<")]
    assert stated == [set(layer) for layer in LAYERS]
