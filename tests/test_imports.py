"""The package's import graph: layers that import only downward, no circles, the schema knows every method by
name, bitsandbytes only on demand."""

import ast
import subprocess
import sys
from pathlib import Path

from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.config.recipe import METHOD_NAMES
from sharelora_cli.core.paths import PROJECT_ROOT

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
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


# Bottom to top, by stage of the data path. A module belongs to the first layer its name starts with.
LAYERS = ("core", "config", "data", "models", "adapters", "evaluation", "training", "outputs", "cli")
# The sandbox starts once per HumanEval sample and runs beside hostile code: it stays lean.
SANDBOX_MAY_IMPORT = ("sharelora_cli.core", "sharelora_cli.evaluation.sandbox")


def layer_of(module: str) -> int:
    """Index in LAYERS; the package itself, __main__ and cli are the top."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return LAYERS.index("cli")
    return LAYERS.index(parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer, as 'a -> b'."""
    return [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]


def sandbox_reaches_out(graph: dict[str, set[str]]) -> list[str]:
    inside = {m: t for m, t in graph.items() if m.startswith("sharelora_cli.evaluation.sandbox")}
    return [
        f"{a} -> {b}"
        for a, targets in sorted(inside.items())
        for b in sorted(targets)
        if not b.startswith(SANDBOX_MAY_IMPORT)
    ]


def test_every_module_belongs_to_a_layer():
    graph = import_graph()
    top_level = {name.split(".")[1] for name in graph if name.count(".") >= 1}
    assert top_level - {"cli", "__main__"} == set(LAYERS) - {"cli"}
    assert all(0 <= layer_of(name) < len(LAYERS) for name in graph)


def test_layer_checker_finds_a_planted_upward_import():
    planted = {
        "sharelora_cli.data.examples": {"sharelora_cli.training.loop", "sharelora_cli.core.errors"},
        "sharelora_cli.training.loop": {"sharelora_cli.data.examples"},
    }
    assert upward_imports(planted) == ["sharelora_cli.data.examples -> sharelora_cli.training.loop"]
    assert sandbox_reaches_out({"sharelora_cli.evaluation.sandbox.session": {"sharelora_cli.evaluation.engine"}})


def test_each_layer_imports_only_from_layers_below_it():
    graph = import_graph()
    assert graph["sharelora_cli.training.loop"] and graph["sharelora_cli.cli"]
    assert upward_imports(graph) == []


def test_the_sandbox_imports_only_core_and_itself():
    assert sandbox_reaches_out(import_graph()) == []


def test_each_sub_package_says_what_lives_there_and_what_it_may_import():
    for layer in LAYERS[:-1]:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), layer


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "sharelora_cli.config.recipe" in graph and graph["sharelora_cli.training.loop"]
    assert find_cycle(graph) is None


def test_the_schema_names_exactly_the_registered_methods():
    assert list(METHOD_NAMES) == list(METHODS)


def test_loading_recipes_and_the_training_and_eval_modules_does_not_import_bitsandbytes():
    code = (
        "import sys\n"
        "import sharelora_cli.cli, sharelora_cli.training.loop, sharelora_cli.outputs.merge, sharelora_cli.outputs.export\n"
        "import sharelora_cli.evaluation.runner\n"
        "from sharelora_cli.config.recipe import load_recipe\n"
        "load_recipe('quickstart', ['train.max_steps=3'])\n"
        "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
