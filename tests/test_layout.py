"""The package's structure holds: no import cycle between HYPER's modules, no import against the
layer order docs/architecture.md states (imports inside functions count for both), and the pure
modules import neither Ray, MLflow nor torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (REPO / "sweep", REPO / "bench")
ARCHITECTURE = REPO / "docs" / "architecture.md"


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _known() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in pkg.rglob("*.py")}


def _resolve(name: str, known) -> str | None:
    """The HYPER module an import names: itself, or its package when it names an attribute."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> HYPER modules it imports anywhere in its body (top level or in functions; a
    package's `__init__` importing its submodules counts, as it does at run time)."""
    known = _known()
    graph = {}
    for mod, path in known.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", "") == "TYPE_CHECKING"
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: never imported at run time
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")
                    up = up[:len(up) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import sub` imports sub; `from pkg import name`, pkg (resolved below)
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                target = _resolve(n, known)
                # an ancestor package is imported first anyway: `from . import x` is no cycle
                if target and target != mod and not mod.startswith(target + "."):
                    deps.add(target)
        graph[mod] = deps
    return graph


def _cycle(graph) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def layers(text: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """The layer order, lowest first: docs/architecture.md's ```layers block, one layer a line
    (its name, then the module prefixes in it)."""
    text = ARCHITECTURE.read_text(encoding="utf-8") if text is None else text
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    return [(name, tuple(prefixes)) for name, *prefixes in
            (line.split() for line in block.splitlines() if line.strip())]


def layer_of(mod: str, order) -> int | None:
    """Index of the layer naming the longest prefix of `mod` (None: in no layer)."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(order) for p in prefixes
                if mod == p or mod.startswith(p + ".")), default=None)
    return best and best[1]


def against(graph, order) -> list[str]:
    """Every import from a module into a layer after its own, and every module in no layer."""
    where = {m: layer_of(m, order) for m in graph}
    bad = [f"{m}: in no layer of docs/architecture.md" for m, i in where.items() if i is None]
    return bad + [f"{m} ({order[where[m]][0]}) imports {d} ({order[where[d]][0]})"
                  for m in sorted(graph) for d in sorted(graph[m])
                  if None not in (where[m], where[d]) and where[d] > where[m]]


def test_no_import_cycle_even_inside_functions():
    graph = import_graph()
    assert len(graph) > 20
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# Arrows against the layers still in the code, each with what removes it. The test fails when
# one is gone too, so that this list only shrinks.
PENDING: dict[str, str] = {}  # an arrow against the layers, with what removes it


def test_no_import_against_the_documented_layers_even_inside_functions():
    order = layers()
    assert [n for n, _ in order][:3] == ["foundation", "registries", "inputs"] and len(order) > 8
    bad = against(import_graph(), order)
    new = [b for b in bad if b not in PENDING]
    assert not new, "imports against docs/architecture.md's layers:\n" + "\n".join(new)
    assert set(PENDING) <= set(bad), f"gone, drop from PENDING: {set(PENDING) - set(bad)}"


def test_layer_check_finds_an_arrow_against_the_order():
    order = layers("```layers\nlow a\nhigh a.up b\n```")
    assert layer_of("a.x", order) == 0 and layer_of("a.up.y", order) == 1
    assert layer_of("c", order) is None
    assert against({"a.x": {"a.up.y"}, "a.up.y": {"a.x"}, "b": set()}, order) == [
        "a.x (low) imports a.up.y (high)"]


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


PURE = ["sweep.techniques.recipe", "sweep.techniques", "sweep.search.space", "sweep.results.pareto",
        "sweep.results.figures",
        "sweep.results.rows", "sweep.measure.scoring", "sweep.inputs.machine"]


@pytest.mark.parametrize("mod", PURE)
def test_pure_modules_import_no_ray_mlflow_or_torch(mod):
    code = (f"import sys, {mod}; heavy = [m for m in ('ray', 'mlflow', 'torch') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
