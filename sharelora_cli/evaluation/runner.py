"""`sharelora eval`: settle the settings (recipe, then command-line flags), load the model once, run each task.

With a recipe, the model, the eval section and OUTPUT_DIR/adapter come from it; flags override them.
Without one, --model is required and the defaults of EvalConfig apply.
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from sharelora_cli.config.recipe import EvalConfig, Recipe, load_recipe, validate
from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation import gsm8k, humaneval_task, mmlu, perplexity
from sharelora_cli.evaluation.engine import Engine, context_window
from sharelora_cli.evaluation.results import TaskResult, results_document, write_json

DEFAULT_RESULTS_FILE = "eval_results.json"


@dataclass
class EvalRequest:
    """What the command line asked for; None means "as the recipe (or EvalConfig) says"."""

    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    no_adapter: bool = False
    tasks: str | None = None
    limit: int | None = None
    batch_size: str | None = None
    gsm8k_path: str | None = None
    data: str | None = None
    text_field: str | None = None
    samples: str | None = None
    results_file: str | None = None
    allow_code_execution: bool = False
    allow_weak_sandbox: bool = False


@dataclass
class EvalReport:
    results: Mapping[str, TaskResult]
    results_file: Path


def resolve_recipe(request: EvalRequest) -> Recipe:
    """The recipe (or the defaults) with the command-line flags applied, validated."""
    if request.recipe:
        values = load_recipe(request.recipe, request.overrides).model_dump()
    elif request.overrides:
        raise UserError("key=value overrides need a RECIPE; without one use the flags (--tasks, --limit, ...)")
    else:
        values = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.create(Recipe().model_dump()), resolve=True))
    flags = {
        ("model", "name_or_path"): request.model,
        ("eval", "tasks"): [t.strip() for t in request.tasks.split(",") if t.strip()] if request.tasks else None,
        ("eval", "limit"): request.limit,
        ("eval", "batch_size"): _batch_size(request.batch_size),
        ("eval", "adapter"): request.adapter,
        ("eval", "results_file"): request.results_file,
        ("eval", "gsm8k", "path"): request.gsm8k_path,
        ("eval", "perplexity", "path"): request.data,
        ("eval", "perplexity", "field"): request.text_field,
    }
    for keys, value in flags.items():
        if value is not None:
            section = values
            for key in keys[:-1]:
                section = section[key]
            section[keys[-1]] = value
    return validate(values, source="eval")


def _batch_size(text: str | None) -> int | str | None:
    return int(text) if text is not None and text.isdigit() else text


def adapter_dir(request: EvalRequest, recipe: Recipe) -> Path | None:
    if request.no_adapter:
        return None
    from sharelora_cli.adapters.adapter_io import CONFIG_FILE, read_adapter_config

    if recipe.eval.adapter:
        read_adapter_config(Path(recipe.eval.adapter))  # a wrong --adapter fails before the model loads
        return Path(recipe.eval.adapter)
    if not request.recipe:
        return None
    path = Path(recipe.output_dir) / "adapter"
    if not (path / CONFIG_FILE).is_file():
        raise UserError(
            f"{path} has no adapter: run `sharelora train {request.recipe}` first, pass --adapter DIR, or --no-adapter"
        )
    return path


def results_path(request: EvalRequest, recipe: Recipe) -> Path:
    if recipe.eval.results_file:
        return Path(recipe.eval.results_file)
    return Path(recipe.output_dir) / "eval.json" if request.recipe else Path(DEFAULT_RESULTS_FILE)


def needs_model(request: EvalRequest, tasks: Sequence[str]) -> bool:
    return any(task != "humaneval" or request.samples is None for task in tasks)


def build_engine(recipe: Recipe, adapter: Path | None) -> Engine:
    from sharelora_cli.adapters.adapter_io import load_adapter
    from sharelora_cli.models.loading import load_model, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code)
    model = load_model(recipe.model, recipe.quantization, device)
    if adapter is not None:
        load_adapter(model, adapter)
    return Engine(model, tokenizer, recipe.eval.batch_size, context_window(model, recipe.eval.max_length))


@dataclass(frozen=True)
class CodeExecution:
    """What the user allowed for HumanEval: running model-written code at all, and with the weaker guard."""

    allowed: bool = False
    weak_sandbox: bool = False


def run_task(
    task: str,
    engine: Engine | None,
    cfg: EvalConfig,
    code: CodeExecution,
    samples: Path | None = None,
    results_file: Path | None = None,
) -> TaskResult:
    """One task with the eval section's settings, seeded by eval.seed so that it scores the same every time."""
    set_seed(cfg.seed)
    if task == "humaneval":
        return humaneval_task.evaluate(
            engine, cfg.humaneval, cfg.limit, samples, code.allowed, code.weak_sandbox, results_file
        )
    assert engine is not None  # needs_model() holds for every other task
    module = {"gsm8k": gsm8k, "mmlu": mmlu, "perplexity": perplexity}[task]
    return module.evaluate(engine, getattr(cfg, task), cfg.limit)


def run_eval(request: EvalRequest) -> EvalReport:
    """Run the requested tasks and write the results file; returns what the table shows."""
    recipe = resolve_recipe(request)
    tasks = list(dict.fromkeys(recipe.eval.tasks))
    if "humaneval" in tasks:
        humaneval_task.require_permission(request.allow_code_execution, request.allow_weak_sandbox)
    if request.samples is not None and "humaneval" not in tasks:
        raise UserError("--samples scores HumanEval completions: add humaneval to --tasks")
    if request.gsm8k_path is not None and "gsm8k" not in tasks:
        raise UserError("--gsm8k-path gives the gsm8k task's data: add gsm8k to --tasks")
    engine, adapter = None, None
    if needs_model(request, tasks):
        if not request.recipe and not request.model:
            raise UserError("eval needs --model PATH_OR_ID (or a RECIPE) to run " + ", ".join(tasks))
        adapter = adapter_dir(request, recipe)
        engine = build_engine(recipe, adapter)
    path = results_path(request, recipe)
    code = CodeExecution(request.allow_code_execution, request.allow_weak_sandbox)
    samples = Path(request.samples) if request.samples else None
    results: dict[str, TaskResult] = {}
    seconds: dict[str, float] = {}
    for task in tasks:
        started = time.perf_counter()
        results[task] = run_task(task, engine, recipe.eval, code, samples, path)
        seconds[task] = round(time.perf_counter() - started, 3)
    write_json(results_document(results, run_config(request, recipe, engine, adapter, seconds)), path)
    humaneval_task.progress_file(path).unlink(missing_ok=True)  # the results file now holds every record
    return EvalReport(results, path)


def run_config(
    request: EvalRequest, recipe: Recipe, engine: Engine | None, adapter: Path | None, seconds: dict
) -> dict:
    """What produced the numbers: model, adapter, settings, machine, timings."""
    return {
        "model": recipe.model.name_or_path if engine else None,
        "adapter": str(adapter) if adapter else None,
        "recipe": request.recipe,
        "samples_file": str(request.samples) if request.samples else None,
        "device": str(engine.device) if engine else None,
        "dtype": str(next(engine.model.parameters()).dtype) if engine else None,
        "max_length": engine.max_length if engine else None,
        "eval": recipe.eval.model_dump(),
        "seconds": seconds,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
