"""Continual fine-tuning: a recipe's stages, trained in order, each continuing the adapter the stage before left.

OUTPUT_DIR/stage-K/ is an ordinary run directory for stage K (adapter, metrics, checkpoints, summary). Once
before the first stage and after each one, every stage's evaluations run on the adapter so far; they are
written to initial_eval.json and stage-K/eval.json, and the accuracy matrix with its summaries
(continual_metrics.py) to OUTPUT_DIR/continual.json. A stage whose summary.json exists is done, so
`resume=true` continues a killed run at its first unfinished stage, from that stage's newest checkpoint:
the final adapter is the one an uninterrupted run ends with.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState

from sharelora_cli.config.recipe import Recipe, stage_name, stage_recipe, to_yaml
from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.humaneval_task import require_permission
from sharelora_cli.evaluation.results import TaskResult, results_document, write_json
from sharelora_cli.evaluation.runner import CodeExecution, build_engine, run_task
from sharelora_cli.training.continual_metrics import ContinualTask, summarize
from sharelora_cli.training.loop import SUMMARY_FILE, train

CONTINUAL_FILE = "continual.json"
INITIAL_EVAL_FILE = "initial_eval.json"
STAGE_EVAL_FILE = "eval.json"
# The accuracy each task is scored by in the matrix.
PRIMARY_METRIC = {"gsm8k": "strict-match", "mmlu": "acc_micro", "humaneval": "pass@1"}


def stage_dir(recipe: Recipe, index: int) -> Path:
    return Path(recipe.output_dir) / f"stage-{index + 1}"


def continual_tasks(recipe: Recipe) -> list[ContinualTask]:
    """The matrix's columns: every eval task of every stage, named by its stage (and task, when a stage has several)."""
    columns = []
    for k in range(len(recipe.stages)):
        tasks = stage_recipe(recipe, k).eval.tasks
        for task in tasks:
            name = stage_name(recipe, k) if len(tasks) == 1 else f"{stage_name(recipe, k)}/{task}"
            columns.append(ContinualTask(name, k, task))
    return columns


def stage_run(recipe: Recipe, index: int) -> Recipe:
    """Stage `index` as a plain run: its own output directory, continuing the previous stage's adapter."""
    stage = stage_recipe(recipe, index)
    adapter = stage.adapter
    if index > 0:
        adapter = adapter.model_copy(
            update={"init_from": str(stage_dir(recipe, index - 1) / "adapter"), "init_optimizer": False}
        )
    return stage.model_copy(update={"output_dir": str(stage_dir(recipe, index)), "adapter": adapter})


@dataclass
class ContinualReport:
    summary: dict | None  # None on processes other than the main one, which alone evaluates
    path: Path


def run_stages(recipe: Recipe, code: CodeExecution = CodeExecution()) -> ContinualReport:
    """Train every stage in order (skipping finished ones), evaluating all stages' tasks before and after each."""
    output_dir = Path(recipe.output_dir)
    check_output_dir(recipe)
    columns = continual_tasks(recipe)
    if any(column.task == "humaneval" for column in columns):
        require_permission(code.allowed, code.weak_sandbox)
    process = PartialState()
    if process.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(to_yaml(recipe))
    initial_adapter = Path(recipe.adapter.init_from) if recipe.adapter.init_from else None
    initial = main_only(process, scores, recipe, columns, initial_adapter, output_dir / INITIAL_EVAL_FILE, code)
    rows: list[list[float]] = []
    summary = None
    for index in range(len(recipe.stages)):
        run = stage_run(recipe, index)
        if not (Path(run.output_dir) / SUMMARY_FILE).is_file():
            train(run, code)
        row = main_only(
            process,
            scores,
            recipe,
            columns,
            Path(run.output_dir) / "adapter",
            Path(run.output_dir) / STAGE_EVAL_FILE,
            code,
        )
        if process.is_main_process:
            rows.append(row)
            summary = summarize(columns, rows, initial)
            write_json(summary, output_dir / CONTINUAL_FILE)
    return ContinualReport(summary, output_dir / CONTINUAL_FILE)


def main_only(process: PartialState, function, *args):
    """function(*args) on the main process (None elsewhere), the others waiting for it."""
    result = function(*args) if process.is_main_process else None
    process.wait_for_everyone()
    return result


def check_output_dir(recipe: Recipe) -> None:
    started = [d.name for d in sorted(Path(recipe.output_dir).glob("stage-*")) if d.is_dir()]
    if started and not recipe.resume:
        raise UserError(
            f"output_dir {recipe.output_dir} already holds {', '.join(started)}; pass resume=true to "
            "continue that run, or choose another output_dir"
        )


def scores(
    recipe: Recipe, columns: list[ContinualTask], adapter: Path | None, path: Path, code: CodeExecution
) -> list[float]:
    """Every column's accuracy with this adapter: read from `path` when an earlier attempt wrote it, else evaluated."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if all(column.name in saved for column in columns):
            return [saved[column.name][PRIMARY_METRIC[column.task]] for column in columns]
    engine = build_engine(recipe, adapter)
    results: dict[str, TaskResult] = {}
    for column in columns:
        stage = stage_recipe(recipe, column.stage)
        results[column.name] = run_task(column.task, engine, stage.eval, code, data_format=stage.data.format)
    config = {
        "model": recipe.model.name_or_path,
        "adapter": str(adapter) if adapter else None,
        "metrics": {column.name: PRIMARY_METRIC[column.task] for column in columns},
    }
    write_json(results_document(results, config), path)
    return [primary_score(results[column.name], column.task) for column in columns]


def primary_score(result: TaskResult, task: str) -> float:
    """The task's accuracy, which (unlike a perplexity) is always defined."""
    value = result.metrics[PRIMARY_METRIC[task]]
    assert value is not None
    return float(value)
