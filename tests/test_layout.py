"""The architecture as the import graph shows it: no circles, and the edges where they belong.

Read from the source with `ast` (every import, also those inside functions), so a lazy import
that closes a circle counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainable", "spaces", "search", "synthetic")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, for every module of the packages."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from search import tracking` imports the module search.tracking
                found = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for target in found:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(f"{target}."):
                    targets.add(target)
        graph[name] = targets
    return graph


def external_imports(package: str) -> set[str]:
    """The top-level names a package's modules import."""
    return set().union(*(external_imports_of(p) for p in (ROOT / package).rglob("*.py")))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by depth-first search (each reported once per entry)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    assert len(graph) > 40  # the packages were found
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_one_trial_runs_in_plain_python():
    """trainable/ (one trial) and the synthetic release import neither Ray nor MLflow, nor the
    service."""
    for package in ("trainable", "synthetic", "spaces"):
        assert not external_imports(package) & {"ray", "mlflow", "optuna", "search"}, package


# search/mlflow_model.py is the logged model's code (MLflow's models-from-code): MLflow runs that
# file by itself when it loads the model, so it must import MLflow (`set_model`, `PythonModel`);
# it never talks to a tracking store.
MLFLOW_MODEL_CODE = "search.mlflow_model"


def test_only_the_tracking_module_talks_to_mlflow():
    graph_users = sorted(
        _module_name(path) for path in (ROOT / "search").rglob("*.py")
        if "mlflow" in external_imports_of(path)
    )
    assert graph_users == sorted(["search.tracking", MLFLOW_MODEL_CODE]), graph_users
    # ... and nothing of the project imports the model's code: only MLflow runs it.
    assert not [name for name, targets in import_graph().items()
                if MLFLOW_MODEL_CODE in targets]


def external_imports_of(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots
