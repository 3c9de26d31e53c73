"""The package's import graph: no circles, the schema knows every method by name, bitsandbytes only on demand."""

import ast
import subprocess
import sys
from pathlib import Path

from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.paths import PROJECT_ROOT
from sharelora_cli.recipe import METHOD_NAMES

PACKAGE = PROJECT_ROOT / "sharelora_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Package modules a file imports anywhere in it (top level, inside functions, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "sharelora_cli.recipe" in graph and graph["sharelora_cli.train"]
    assert find_cycle(graph) is None


def test_the_schema_names_exactly_the_registered_methods():
    assert list(METHOD_NAMES) == list(METHODS)


def test_loading_recipes_and_the_training_and_eval_modules_does_not_import_bitsandbytes():
    code = (
        "import sys\n"
        "import sharelora_cli.cli, sharelora_cli.train, sharelora_cli.merge, sharelora_cli.export\n"
        "import sharelora_cli.evaluation.runner\n"
        "from sharelora_cli.recipe import load_recipe\n"
        "load_recipe('quickstart', ['train.max_steps=3'])\n"
        "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
