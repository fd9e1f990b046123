"""The project's import graph: dependencies flow one way and nothing imports in a circle.

Every `import` counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("van_tfx", "van_trainer", "components", "pipeline", "serving")
# What each package may import of ours (the README's "dependencies flow one way").
ALLOWED = {
    "van_tfx": set(),
    "serving": {"van_tfx"},
    "van_trainer": {"van_tfx"},
    "components": {"van_tfx", "van_trainer", "serving"},
    "pipeline": {"van_tfx", "van_trainer", "components", "serving"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> set[str]:
    """Modules of ours that a file imports, anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # `from pkg import module` names a module; `from module import function` names the module.
        targets = set()
        for imported in our_imports(path):
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_dependencies_flow_one_way():
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] != module.split(".")[0]
        and target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert wrong == []


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for target in sorted(graph[node]):
            if target in on_path:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in done:
                on_path.add(target)
                visit(target, [*path, target], on_path, done)
                on_path.discard(target)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    assert cycles == []


@pytest.mark.parametrize("module", ["pipeline.local", "pipeline.outcome", "pipeline.kfp_local"])
def test_the_runners_share_the_outcome_code_without_a_circle(module):
    graph = import_graph()
    assert "pipeline.local" not in graph["pipeline.outcome"]
    assert "pipeline.kfp_local" not in graph["pipeline.outcome"]
    if module != "pipeline.outcome":
        assert "pipeline.outcome" in graph[module]


def public_definitions(body: list[ast.stmt], prefix: str = ""):
    """(qualified name, node) of each public function and class in `body`, and their methods."""
    # Public: the name does not start with `_`. Methods of public classes count; nested
    # functions and the methods of private classes do not.
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if not node.name.startswith("_"):
                yield f"{prefix}{node.name}", node
                if isinstance(node, ast.ClassDef):
                    yield from public_definitions(node.body, f"{prefix}{node.name}.")


def test_every_public_function_has_a_one_line_docstring():
    # The style guide: "Docstring every public function in one line; comment the why, not the
    # what." Details belong in `#` comments at the top of the body.
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, node in public_definitions(tree.body):
                doc = ast.get_docstring(node, clean=False)
                if doc is None or "\n" in doc.strip():
                    problem = "no docstring" if doc is None else "docstring of several lines"
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    offenders.append(f"{where} {name}: {problem}")
    assert not offenders, "public definitions without a one-line docstring:\n" + "\n".join(
        offenders
    )
