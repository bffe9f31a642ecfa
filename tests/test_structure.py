"""The shape of the package, read with the standard library's ``ast``: no module of kd_utils over 500 lines,
and no import circle among kd_utils modules.

The import graph has one node per module of kd_utils (a package is its ``__init__``) and an edge M -> N for
every ``import``/``from ... import`` statement of M that loads N, wherever it stands (module level, inside a
function, under ``if TYPE_CHECKING``): a circle through a deferred import is still two modules that each
need the other.

- ``import a.b.c`` and ``from a.b.c import name``: an edge to ``a.b.c``; and to ``a.b.c.name`` where that is a
  module (``from kd_utils import fidelity``), else the name is read from ``a.b.c`` itself (for a package:
  from its ``__init__``).
- Python loads the parent packages of what it imports first, so the statement also gives an edge to every
  parent package of the target that is not a parent of M: ``kd_utils.tasks`` importing
  ``kd_utils.statistics.results`` runs ``kd_utils/statistics/__init__.py``, which must then not import
  ``kd_utils.tasks`` back.
- The parents M shares are left out: M's own packages are already loading when M runs, so a package whose
  ``__init__`` re-exports its submodules is not a circle by itself. A submodule that imports a name from its
  own package's ``__init__`` (``from kd_utils.statistics import holm`` inside ``kd_utils.statistics``) does
  make an edge to the ``__init__``, and so a circle when that ``__init__`` imports the submodule: such an
  import works or fails with the order the modules happen to be loaded in.
- Imports by string (``importlib.import_module``) are not statements and are not seen; kd_utils has none.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "kd_utils"
MAX_LINES = 500


def module_files() -> dict[str, Path]:
    """Every module of kd_utils by dotted name (a package by its own name, for its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def parents(name: str) -> list[str]:
    """The packages above a dotted name, outermost first: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The kd_utils modules that module ``name`` imports (the rules of this file's docstring)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    direct: set[str] = set()  # what the statements name: edges even to M's own packages
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            direct.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..y import z
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
            direct.update(submodules)
            if len(submodules) < len(node.names):  # a name read from the module (a package: its __init__)
                direct.add(source)
    direct &= modules  # kd_utils modules only (not numpy, ...)
    own = set(parents(name)) | {name}
    implicit = {p for target in direct for p in parents(target)} - own  # parent packages loaded on the way
    return (direct | implicit) - {name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:  # the graph has a few dozen nodes: recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(circles)


def test_no_module_over_500_lines():
    long = {name: n for name, path in module_files().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_no_import_circle():
    circles = import_circles(import_graph())
    assert not circles, "import circles among kd_utils modules: " + "; ".join(" <-> ".join(c) for c in circles)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for other in graph.get(todo.pop(), ()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


#: data flows params -> plan -> runs -> results.csv -> analysis -> report: a module on the left of a pair
#: (and, for a package, every module in it) must not reach any module on the right
DOWNSTREAM = (
    ("kd_utils.statistics", {"kd_utils.fidelity", "kd_utils.analysis", "kd_utils.pipeline_simulation",
                             "kd_utils.report", "kd_utils.report_blocks", "kd_utils.report_findings",
                             "kd_utils.provenance", "kd_utils.study"}),
    ("kd_utils.analysis", {"kd_utils.report", "kd_utils.report_blocks", "kd_utils.report_findings",
                           "kd_utils.provenance", "kd_utils.pipeline_simulation", "kd_utils.study"}),
)


def test_imports_follow_the_data_flow():
    graph = import_graph()
    wrong = {}
    for lower, upper in DOWNSTREAM:
        for name in [m for m in graph if m == lower or m.startswith(lower + ".")]:
            if reachable(graph, name) & upper:
                wrong[name] = sorted(reachable(graph, name) & upper)
    assert not wrong, f"modules that import what comes after them in the data flow: {wrong}"


def test_the_graph_sees_deferred_relative_and_parent_package_imports(tmp_path, monkeypatch):
    """The rules on a small package: a circle through an import inside a function, a relative import and the
    implicit import of a parent package are found; a package re-exporting its submodules is not a circle."""
    pkg = tmp_path / "kd_utils"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from kd_utils import b\n",
        "b.py": "from .a import f\n",  # a <-> b, through a deferred and a relative import
        "c.py": "from kd_utils.sub.inner import x\n",  # loads kd_utils.sub (its __init__) first
        "sub/__init__.py": "from kd_utils.sub.inner import x\nfrom kd_utils.sub.other import y\n",
        "sub/inner.py": "x = 1\n",
        "sub/other.py": "import kd_utils.c\ny = 2\n",  # sub -> other -> c -> sub: a circle
        "lone/__init__.py": "from .leaf import z\n",
        "lone/leaf.py": "import kd_utils.lone.twig\nz = 3\n",  # re-exported submodules only: no circle
        "lone/twig.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    monkeypatch.setitem(globals(), "PACKAGE_DIR", pkg)
    graph = import_graph()
    assert graph["kd_utils.c"] == {"kd_utils.sub.inner", "kd_utils.sub"}
    assert graph["kd_utils.lone.leaf"] == {"kd_utils.lone.twig"}
    assert import_circles(graph) == [["kd_utils.a", "kd_utils.b"], ["kd_utils.c", "kd_utils.sub", "kd_utils.sub.other"]]


def test_a_name_that_moved_says_where_it_went():
    import importlib

    import pytest

    for module, name, where in [("kd_utils.training", "distill_mask", "kd_utils.objectives"),
                                ("kd_utils.training", "PAPER_NAMES", "kd_utils.constants"),
                                ("kd_utils.statistics.simulation", "study_outcomes", "kd_utils.pipeline_simulation")]:
        with pytest.raises(AttributeError, match=where):
            getattr(importlib.import_module(module), name)
        with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
            _ = importlib.import_module(module).no_such_name
