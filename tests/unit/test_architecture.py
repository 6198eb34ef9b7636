"""The architecture is checked, not just drawn.

- every import-linter contract in pyproject.toml is kept, and an upward import breaks it;
- no import cycle between modules, counting imports inside functions;
- no module over 500 lines, in the package, the built-in filters, the tests and the benchmark alike;
- the core reaches the built-in filters only through entry points, and nobody outside a filter's
  package imports its private modules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pop3proxy"
FILTERS = ROOT / "filters"
TESTS = ROOT / "tests"
BENCH = ROOT / "bench"
MAX_LINES = 500

CONTRACT_LINE = re.compile(r"^(?P<name>.+?) (?P<status>KEPT|BROKEN)$", re.MULTILINE)


def contract_names() -> list[str]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [contract["name"] for contract in config["tool"]["importlinter"]["contracts"]]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the project in *cwd* (its pyproject.toml, its pop3proxy/), no cache."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
            "--no-cache",
        ],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_import_contract_is_kept():
    names = contract_names()
    assert names, "pyproject.toml declares no import-linter contract"
    result = lint_imports(ROOT)
    output = result.stdout + result.stderr
    statuses = {m["name"]: m["status"] for m in CONTRACT_LINE.finditer(output)}
    assert result.returncode == 0, output
    assert statuses == {name: "KEPT" for name in names}, output


def copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    ignore = shutil.ignore_patterns("__pycache__")
    # The repository folder filters/ is installed as pop3proxy.filters: the copy puts it there, as the
    # wheel does (a checkout may hold a pop3proxy/filters link to it, a fresh clone does not).
    shutil.copytree(PACKAGE, project / "pop3proxy", ignore=shutil.ignore_patterns("__pycache__", "filters"))
    shutil.copytree(FILTERS, project / "pop3proxy" / "filters", ignore=ignore)
    return project


@pytest.fixture(scope="module")
def edges(tmp_path_factory) -> dict[str, set[str]]:
    """Who imports whom in an unmodified copy of the package, built-in filters included."""
    return import_edges(copy_project(tmp_path_factory.mktemp("tree")))


def add_function_import(module: Path, statement: str) -> None:
    """Append a function whose body imports upward (function-level imports count)."""
    text = module.read_text()
    module.write_text(text + f"\n\ndef _upward_import_for_the_test():\n    {statement}\n")


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    project = copy_project(tmp_path)
    add_function_import(project / "pop3proxy" / "pop3" / "commands.py", "from pop3proxy import app")
    add_function_import(project / "pop3proxy" / "store" / "maildir.py", "from pop3proxy.net import pop3_server")
    result = lint_imports(project)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Layers: imports only go down BROKEN" in output, output
    assert "pop3proxy.pop3.commands -> pop3proxy.app" in output, output
    assert "pop3proxy.store.maildir -> pop3proxy.net.pop3_server" in output, output


def test_trio_in_the_sans_io_core_breaks_its_contract(tmp_path):
    project = copy_project(tmp_path)
    add_function_import(project / "pop3proxy" / "pop3" / "framing.py", "import trio")
    result = lint_imports(project)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "The POP3 core is sans-IO: no trio, os, socket or ssl BROKEN" in output, output
    assert "pop3proxy.pop3.framing -> trio" in output, output


def strongly_connected_components(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components of one node without a self-loop
    are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        components.append(sorted(component))
    return components


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(strongly_connected_components(set(edges), edges)) == [["a", "b", "c"], ["e"]]


# grimp reads every import statement, including those inside functions; imports guarded by
# ``if TYPE_CHECKING:`` never run, so they cannot form a cycle at run time.
GRAPH_SCRIPT = """
import json, grimp
g = grimp.build_graph("pop3proxy", exclude_type_checking_imports=True, cache_dir=None)
print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m) & g.modules) for m in g.modules}))
"""


def import_edges(project: Path) -> dict[str, set[str]]:
    """The imports between modules of the pop3proxy package found in *project*, built in a child process
    so that the tree under test is the one imported."""
    result = subprocess.run(
        [sys.executable, "-c", GRAPH_SCRIPT],
        cwd=project,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(project)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return {module: set(imported) for module, imported in json.loads(result.stdout).items()}


def cycles_of(edges: dict[str, set[str]]) -> list[list[str]]:
    return strongly_connected_components(set(edges), edges)


def test_no_import_cycle_between_modules(edges):
    assert "pop3proxy.filters.spam" in edges and "pop3proxy.app" in edges
    cycles = cycles_of(edges)
    report = "\n".join(" <-> ".join(cycle) for cycle in cycles)
    print(report)
    assert cycles == [], f"import cycles (counting imports inside functions):\n{report}"


def test_a_cycle_behind_a_function_level_import_is_found(tmp_path):
    project = copy_project(tmp_path)
    # the leaf metrics module reaching back up into app, as it once did for StartupError
    add_function_import(project / "pop3proxy" / "ops" / "metrics.py", "from pop3proxy import app")
    cycles = cycles_of(import_edges(project))
    assert len(cycles) == 1, cycles
    assert {"pop3proxy.ops.metrics", "pop3proxy.app"} <= set(cycles[0]), cycles


def test_no_module_over_500_lines():
    too_long = {}
    for folder in (PACKAGE, FILTERS, TESTS, BENCH):
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts or "node_modules" in path.parts:
                continue
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                too_long[str(path.relative_to(ROOT))] = lines
    assert too_long == {}, f"modules over {MAX_LINES} lines: {too_long}"


def is_filter(module: str) -> bool:
    return module == "pop3proxy.filters" or module.startswith("pop3proxy.filters.")


def test_the_core_reaches_builtin_filters_only_through_entry_points(edges):
    assert "pop3proxy.filters.spam" in edges
    offending = sorted(
        f"{importer} -> {imported}"
        for importer, imported_set in edges.items()
        if not is_filter(importer)
        for imported in imported_set
        if is_filter(imported)
    )
    assert offending == [], offending


def private_imports_from_outside(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a private module (a `_name` part) by a module outside the package that holds it."""
    offending = []
    for importer, imported_set in edges.items():
        for module in imported_set:
            parts = module.split(".")
            private = [i for i, part in enumerate(parts) if part.startswith("_") and not part.startswith("__")]
            if not private:
                continue
            package = ".".join(parts[: private[0]])
            if importer != package and not importer.startswith(package + "."):
                offending.append(f"{importer} -> {module}")
    return sorted(offending)


def test_no_private_filter_module_is_imported_from_outside_its_package(edges):
    assert "pop3proxy.filters._bayes" in edges["pop3proxy.filters.spam"]  # allowed: inside the package
    assert private_imports_from_outside(edges) == []
    # and the check bites: the command line reaching into the spam filter's classifier
    reaching_in = {**edges, "pop3proxy.cli": edges["pop3proxy.cli"] | {"pop3proxy.filters._bayes"}}
    assert private_imports_from_outside(reaching_in) == ["pop3proxy.cli -> pop3proxy.filters._bayes"]
