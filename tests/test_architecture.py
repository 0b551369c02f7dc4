"""The architecture, enforced: who may import whom inside ``enkal/``, no import cycles, and
no module too long to read (``../shared/STYLE.md``, issue "One iteration, one place").

The graph is read from the source (``ast``), every ``import`` statement counted, also the
ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import enkal

ROOT = Path(enkal.__file__).parent

#: the layers, lowest first; a module may import its own layer or lower ones only
LEAVES = {"enkal._version", "enkal.errors", "enkal._checks"}
SHARED = {"enkal.observations", "enkal.ensemble", "enkal._types"}
KERNELS = {"enkal.update", "enkal.information", "enkal.filtering.kernels",
           "enkal.filtering.metrics"}
COMPONENTS = {"enkal.schedule", "enkal.failures", "enkal.collapse", "enkal.adapt",
              "enkal.forward", "enkal.devices", "enkal.executors", "enkal.analysis",
              "enkal.priors", "enkal.progress", "enkal.sampler", "enkal.filtering.schemes", "enkal.filtering.local",
              "enkal.localization", "enkal.inversion", "enkal.acceleration", "enkal.series",
              "enkal.filtering.progress"}
LOOP = {"enkal.smoother", "enkal.loop", "enkal.filtering", "enkal.filtering.filter", "enkal.filtering.run"}
APPLICATION = {"enkal", "enkal.runner", "enkal.filter_runner", "enkal.filter_cli",
               "enkal.plot_filter", "enkal.config",
               "enkal.experiment", "enkal.cli", "enkal.__main__", "enkal.plot", "enkal.inference"}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = ["enkal", *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The enkal modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "enkal")
        elif isinstance(node, ast.ImportFrom):
            target = node.module if node.level == 0 else \
                _resolve(name, is_package, node.level, node.module)
            if target is None or target.split(".")[0] != "enkal":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
    return {m for m in found if m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> int:
    for rank, layer in enumerate((LEAVES, SHARED, KERNELS, COMPONENTS, LOOP)):
        if module in layer:
            return rank
    return 99


def test_every_module_has_a_place(graph):
    placed = LEAVES | SHARED | KERNELS | COMPONENTS | LOOP | APPLICATION
    packages = ("enkal.storage", "enkal.nn")
    loose = [m for m in graph if m not in placed and not m.startswith(packages)]
    assert not loose, f"modules without a layer (add them to tests/test_architecture.py): {loose}"


def test_the_core_layers_import_only_downwards(graph):
    bad = []
    for module, deps in graph.items():
        rank = _layer(module)
        if rank == 99:
            continue
        bad += [f"{module} -> {d}" for d in deps if _layer(d) > rank]
    assert not bad, "a lower layer imports a higher one:\n" + "\n".join(sorted(bad))


def test_storage_never_imports_the_loop_nn_or_the_application(graph):
    bad = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("enkal.storage")
           for d in deps if d in LOOP | APPLICATION or d.startswith("enkal.nn")]
    assert not bad, "\n".join(bad)


def test_nn_imports_neither_the_smoother_nor_storage(graph):
    bad = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("enkal.nn")
           for d in deps if d in LOOP | APPLICATION or d.startswith("enkal.storage")]
    assert not bad, "\n".join(bad)


def test_the_smoother_imports_no_storage(graph):
    deps = graph["enkal.smoother"]
    assert not [d for d in deps if d.startswith(("enkal.storage", "enkal.nn"))
                or d in APPLICATION]


def test_only_the_application_joins_the_loop_to_storage(graph):
    joined = [m for m, deps in graph.items()
              if any(d.startswith("enkal.storage") for d in deps)
              and any(d in LOOP for d in deps)]
    assert set(joined) <= APPLICATION, joined


def test_the_core_never_imports_models_or_problems(graph):
    bad = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
           if d.startswith(("enkal.models", "enkal.problems"))]
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_too_long_to_read():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    # the checker itself: a function-level relative import and a from-package import count
    pkg = tmp_path / "enkal"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    from . import errors\n")
    known = {"enkal.sub", "enkal.sub.b", "enkal.errors", "enkal.a"}
    assert _imports("enkal.a", pkg / "a.py", known) == {"enkal.sub.b", "enkal.errors"}
