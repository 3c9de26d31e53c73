"""`sharelora eval`: settle the settings (recipe, then command-line flags), load the model once, run each task.

With a recipe, the model, the eval section and OUTPUT_DIR/adapter come from it; flags override them.
Without one, the defaults of EvalConfig apply (with any key=value overrides), and the model is --model, else
the base the --adapter was trained on.
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate.utils import set_seed

from sharelora_cli.config.recipe import EvalConfig, Recipe, defaults_with, load_recipe, validate
from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation import gsm8k, humaneval_task, mmlu, perplexity, prompt_formats, trained_with
from sharelora_cli.evaluation.engine import Engine, context_window
from sharelora_cli.evaluation.results import TaskResult, results_document, write_json

# Flags that set one key in the section of each task that has it, among the tasks being run:
# (flag, key, least value, tasks).
PER_TASK_FLAGS = (
    ("--num-fewshot", "num_fewshot", 0, ("gsm8k", "mmlu")),
    ("--max-new-tokens", "max_new_tokens", 1, ("gsm8k", "humaneval")),
)


@dataclass
class EvalRequest:
    """What the command line asked for; None means "as the recipe (or EvalConfig) says"."""

    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    no_adapter: bool = False
    tasks: str | None = None
    # Numeric flags as typed (as --batch-size), so that a bad value is one line naming the flag.
    limit: str | None = None
    batch_size: str | None = None
    gsm8k_path: str | None = None
    data: str | None = None
    text_field: str | None = None
    samples: str | None = None
    results_file: str | None = None
    num_fewshot: str | None = None
    max_new_tokens: str | None = None
    prompt_format: str | None = None
    allow_code_execution: bool = False
    allow_weak_sandbox: bool = False


@dataclass
class EvalReport:
    results: Mapping[str, TaskResult]
    results_file: Path


def recipe_and_overrides(
    positional: str | None, option: str | None, overrides: list[str]
) -> tuple[str | None, list[str]]:
    """The recipe and the overrides from RECIPE, --recipe and the rest: `eval key=value ...` has no recipe,
    but the command line hands its first override over as RECIPE."""
    if positional and "=" in positional and not Path(positional).is_file():
        overrides = [positional, *overrides]
        positional = None
    if positional and option:
        raise UserError("give the recipe once: as RECIPE or as --recipe")
    return positional or option, overrides


def resolve_recipe(request: EvalRequest) -> Recipe:
    """The recipe (or the defaults) with the overrides and command-line flags applied, validated."""
    if request.recipe:
        values = load_recipe(request.recipe, request.overrides).model_dump()
    else:
        values = defaults_with(request.overrides, recorded_settings(request))
    flags = {
        ("model", "name_or_path"): request.model,
        ("eval", "tasks"): [t.strip() for t in request.tasks.split(",") if t.strip()] if request.tasks else None,
        ("eval", "limit"): _number("--limit", request.limit, least=1),
        ("eval", "batch_size"): _batch_size(request.batch_size),
        ("eval", "adapter"): request.adapter,
        ("eval", "results_file"): request.results_file,
        ("eval", "prompt_format"): request.prompt_format,
        ("eval", "gsm8k", "path"): request.gsm8k_path,
        ("eval", "perplexity", "path"): request.data,
        ("eval", "perplexity", "field"): request.text_field,
    }
    for keys, value in flags.items():
        if value is not None:
            _set(values, keys, value)
    for flag, key, least, tasks in PER_TASK_FLAGS:
        value = _number(flag, getattr(request, key), least)
        for task in [task for task in tasks if task in values["eval"]["tasks"] and value is not None]:
            _set(values, ("eval", task, key), value)
    return validate(values, source="eval")


def _set(values: dict, keys: tuple[str, ...], value: object) -> None:
    for key in keys[:-1]:
        values = values[key]
    values[keys[-1]] = value


def _number(flag: str, text: str | None, least: int) -> int | None:
    """A whole-number flag, refused in one line that names the flag (the schema would name the recipe key)."""
    if text is None:
        return None
    if not _is_whole(text) or int(text) < least:
        raise UserError(f"{flag} must be {'0 or more' if least == 0 else 'a positive integer'}, got {text!r}")
    return int(text)


def _batch_size(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    if not _is_whole(text) or int(text) == 0:
        raise UserError(f"--batch-size must be auto or a positive integer, got {text!r}")
    return int(text)


def _is_whole(text: str) -> bool:
    return text.isascii() and text.isdigit()  # "²" is a digit to str.isdigit, and no int


def recorded_settings(request: EvalRequest) -> dict:
    """Without a recipe, the base --adapter was trained on (also with --no-adapter: that base alone): its model,
    unless --model names one, and its 4-bit quantization, so the adapter is scored on the weights it learnt with."""
    if request.adapter is None:
        return {}
    adapter = Path(request.adapter)
    model = {} if request.model else {"model": {"name_or_path": trained_with.base_model(adapter)}}
    quantization = trained_with.quantization(adapter)
    return {**model, **({"quantization": quantization} if quantization else {})}


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


def results_path(request: EvalRequest, recipe: Recipe, adapter: Path | None) -> Path:
    """eval.results_file, else a name that says what was evaluated, so that evaluating the base after the
    adapter (or another model) never overwrites the adapter's results."""
    if recipe.eval.results_file:
        return Path(recipe.eval.results_file)
    name = "eval.json" if adapter else "eval-base.json"
    if request.recipe:
        return Path(recipe.output_dir) / name
    if recipe.eval.adapter:  # beside the adapter: RUN/adapter's results land in RUN, as with the recipe
        return Path(recipe.eval.adapter).parent / name
    if recipe.model.name_or_path and needs_model(request, recipe.eval.tasks):
        return Path(f"eval-{Path(recipe.model.name_or_path).expanduser().resolve().name}.json")
    return Path(f"eval-{Path(request.samples or 'samples').name.split('.')[0]}.json")


def trained_format(request: EvalRequest, recipe: Recipe, adapter: Path | None) -> str | None:
    """The data.format the evaluated adapter (or, with --no-adapter, the one named) was trained on, if known."""
    named = adapter or (Path(recipe.eval.adapter) if recipe.eval.adapter else None)
    if named is not None:
        return trained_with.data_format(named, "use eval.prompt_format=harness")
    return recipe.data.format if request.recipe else None


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
    data_format: str | None = None,
) -> TaskResult:
    """One task with the eval section's settings, seeded by eval.seed so that it scores the same every time.

    data_format: what the model was trained on, for eval.prompt_format=train (None: not known)."""
    set_seed(cfg.seed)
    if task == "humaneval":
        return humaneval_task.evaluate(
            engine, cfg.humaneval, cfg.limit, samples, code.allowed, code.weak_sandbox, results_file
        )
    assert engine is not None  # needs_model() holds for every other task
    if task == "gsm8k":
        prompt = prompt_formats.chosen(cfg.prompt_format, data_format, engine.tokenizer)
        return gsm8k.evaluate(engine, cfg.gsm8k, cfg.limit, prompt)
    module = {"mmlu": mmlu, "perplexity": perplexity}[task]
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
    engine, adapter, data_format = None, None, None
    if needs_model(request, tasks):
        if not recipe.model.name_or_path:
            raise UserError(
                "eval needs --model PATH_OR_ID, --adapter DIR (whose base model it uses) or a RECIPE to run "
                + ", ".join(tasks)
            )
        adapter = adapter_dir(request, recipe)
        if recipe.eval.prompt_format == "train" and "gsm8k" in tasks:
            data_format = trained_format(request, recipe, adapter)  # before loading: a missing record fails fast
        engine = build_engine(recipe, adapter)
    path = results_path(request, recipe, adapter)
    code = CodeExecution(request.allow_code_execution, request.allow_weak_sandbox)
    samples = Path(request.samples) if request.samples else None
    results: dict[str, TaskResult] = {}
    seconds: dict[str, float] = {}
    for task in tasks:
        started = time.perf_counter()
        results[task] = run_task(task, engine, recipe.eval, code, samples, path, data_format)
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
