"""The `sharelora` command line: parse, call one function per command, print."""

import json
import sys
from pathlib import Path

import typer

from sharelora_cli.core.errors import UserError

app = typer.Typer(
    help="Fine-tune causal LMs with shared low-rank adapters, driven by YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it from the group
)

OverridesArg = typer.Argument(None, help="key=value recipe overrides, e.g. adapter.rank=16 train.max_steps=50")
AllowCodeExecution = typer.Option(False, "--allow-code-execution", help="let humaneval run model-written code")
AllowWeakSandbox = typer.Option(
    False, "--allow-weak-sandbox",
    help="where Linux namespaces are unavailable (no root, no user namespaces), run humaneval anyway with only"
    " rlimits and an in-process guard that hostile code can switch off (docs/sandbox.md)",
)  # fmt: skip


def print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"sharelora {version('sharelora')}")
        raise typer.Exit()


@app.callback()
def top_level(
    _version: bool = typer.Option(
        False, "--version", callback=print_version, is_eager=True, help="print the installed version and exit"
    ),
) -> None:
    """Fine-tune causal LMs with shared low-rank adapters, driven by YAML recipes."""


@app.command("methods")
def methods_command(
    as_json: bool = typer.Option(False, "--json", help="print the list as JSON"),
) -> None:
    """List the adapter methods, one line each: what it shares or trains, and the recipe key that sizes it."""
    from sharelora_cli.adapters.catalog import format_methods, method_entries, methods_json

    entries = method_entries()
    typer.echo(json.dumps(methods_json(entries), ensure_ascii=False) if as_json else format_methods(entries))


@app.command("recipes")
def recipes_command() -> None:
    """List the shipped recipes."""
    from sharelora_cli.config.recipe import find_recipe, shipped_recipes

    for name in shipped_recipes():
        typer.echo(f"{name:<24}{find_recipe(name)}")


@app.command("show")
def show_command(
    recipe: str = typer.Argument(..., help="recipe path or shipped name"), overrides: list[str] | None = OverridesArg
) -> None:
    """Print the fully resolved recipe (defaults, file and overrides merged)."""
    from sharelora_cli.config.recipe import load_recipe, to_yaml

    typer.echo(to_yaml(load_recipe(recipe, overrides)), nl=False)


@app.command("inspect")
def inspect_command(
    recipe: str | None = typer.Argument(None, help="recipe whose model, rank and targets to use"),
    model: str | None = typer.Option(None, "--model", help="config directory, recipes/models name or hub id"),
    rank: int | None = typer.Option(None, "--rank", help="adapter rank"),
    targets: str | None = typer.Option(None, "--targets", help="comma-separated module types, e.g. q_proj,v_proj"),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="print {method: trainable parameters} as JSON (methods that do not fit the model left out, "
        "with a note on stderr)",
    ),
) -> None:
    """Trainable parameters per method for an architecture, built weightless on the meta device."""
    from sharelora_cli.adapters.param_counts import count_methods, format_table, unfit_notes
    from sharelora_cli.config.recipe import load_recipe, validate

    if recipe is None and model is None:
        raise UserError("inspect needs a RECIPE or --model CONFIG_DIR_OR_ID")
    loaded = load_recipe(recipe) if recipe else validate({})
    adapter = loaded.adapter.model_dump()
    if rank is not None:
        adapter["rank"] = rank
    if targets is not None:
        adapter["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
        adapter["target_regex"] = None
    adapter_config = validate({"adapter": adapter}, source="inspect").adapter
    rows = count_methods(model or loaded.model.name_or_path, adapter_config)
    if as_json:
        typer.echo(json.dumps({row.method: row.trainable for row in rows if row.trainable is not None}))
        for note in unfit_notes(rows):
            typer.echo(note, err=True)
    else:
        typer.echo(format_table(rows))


@app.command("train")
def train_command(
    recipe: str = typer.Argument(..., help="recipe path or shipped name"),
    overrides: list[str] | None = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in output_dir"),
    allow_code_execution: bool = AllowCodeExecution,
    allow_weak_sandbox: bool = AllowWeakSandbox,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="print the resolved recipe, the data summary line and the first training example (trained tokens "
        "marked [[ ]]) and stop: loads only the tokenizer, writes nothing",
    ),
) -> None:
    """Train an adapter from a recipe; writes OUTPUT_DIR/adapter, metrics.jsonl, recipe.yaml, checkpoint-N/.

    A recipe with stages trains them in order into OUTPUT_DIR/stage-K/ and writes OUTPUT_DIR/continual.json.
    """
    from sharelora_cli.config.recipe import load_recipe
    from sharelora_cli.evaluation.runner import CodeExecution
    from sharelora_cli.training.launch import relaunch_as_workers, requested_cpu_processes
    from sharelora_cli.training.loop import AlreadyFinished, Interrupted

    loaded = load_recipe(recipe, [*(overrides or []), *(["resume=true"] if resume else [])])
    processes = requested_cpu_processes()
    if dry_run:
        from sharelora_cli.training.dry_run import dry_run as print_dry_run

        return print_dry_run(loaded, processes, typer.echo)
    if processes > 1:
        raise typer.Exit(relaunch_as_workers(processes, sys.argv[1:]))
    code = CodeExecution(allow_code_execution, allow_weak_sandbox)
    try:
        typer.echo(run_stages_command(loaded, code) if loaded.stages else run_training_command(loaded, code), nl=False)
    except Interrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(stop.exit_code) from None
    except AlreadyFinished as finished:
        typer.echo(str(finished))


def run_training_command(recipe, code) -> str:
    from sharelora_cli.training.loop import train

    summary = train(recipe, code)
    return summary_line(summary) + "\n" if summary.is_main_process else ""


def run_stages_command(recipe, code) -> str:
    from sharelora_cli.config.recipe import stage_name
    from sharelora_cli.training.continual_metrics import format_table
    from sharelora_cli.training.stages import run_stages

    report = run_stages(recipe, code)
    if report.summary is None:
        return ""
    names = [stage_name(recipe, k) for k in range(len(recipe.stages))]
    return f"{format_table(report.summary, names)}\ncontinual results in {report.path}\n"


def summary_line(summary) -> str:
    """The run in one line; a loss that was never computed (no validation split) is left out, not shown as None."""
    losses = [f"final loss {summary.final_loss:.4f}"] if summary.final_loss == summary.final_loss else []
    if summary.final_val_loss is not None:
        losses.append(f"validation loss {summary.final_val_loss:.4f}")
    return (
        ", ".join(
            [
                f"done: {summary.steps} steps, {summary.tokens} tokens, {summary.seconds:.1f} s",
                f"peak memory {summary.peak_memory_bytes / 2**20:.0f} MiB, {summary.trainable_parameters} trainable parameters",
                *losses,
            ]
        )
        + f"; adapter in {summary.output_dir}/adapter"
    )


@app.command("merge")
def merge_command(
    adapter: str = typer.Option(
        ..., "--adapter", help="adapter directory (sharelora_config.json + adapter.safetensors)"
    ),
    out: str = typer.Option(..., "--out", help="new directory for the merged checkpoint"),
    base: str | None = typer.Option(
        None, "--base", help="base model directory or hub id [default: the adapter's base_model]"
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto (keep the base's), bf16, fp16 or fp32"),
    full_precision_base: bool = typer.Option(
        False,
        "--full-precision-base",
        help="for an adapter trained on a 4-bit base: merge into the full-precision weights",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    max_shard_size: str | None = typer.Option(
        None,
        "--max-shard-size",
        help="largest output shard, as in transformers (100MB, 2GB, 1GiB): it bounds the merge's memory [default: 1GiB]",
    ),
) -> None:
    """Fold the adapter into its base and write a plain transformers checkpoint (safetensors, config, tokenizer)."""
    from sharelora_cli.outputs.merge import merge_adapter

    result = merge_adapter(
        Path(adapter), Path(out), base, dtype, full_precision_base, overwrite, max_shard_size=max_shard_size
    )
    typer.echo(result.summary())


@app.command("export")
def export_command(
    adapter: str = typer.Option(
        ..., "--adapter", help="adapter directory (sharelora_config.json + adapter.safetensors)"
    ),
    out: str = typer.Option(..., "--out", help="new directory for the exported adapter"),
    fmt: str = typer.Option(
        "peft",
        "--format",
        help="peft: a PEFT LoRA, MiSS, VeRA or VB-LoRA adapter for PeftModel.from_pretrained "
        "(Tied-LoRA has no PEFT format: use merge); lora: every method as one plain LoRA (one r), "
        "the form vLLM and SGLang serve",
    ),
    base: str | None = typer.Option(
        None, "--base", help="base model config directory or hub id [default: the adapter's base_model]"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    rank: int | None = typer.Option(
        None, "--rank", help="--format lora: SVD rank for full-rank updates [default: the adapter's rank]"
    ),
    max_rank: int | None = typer.Option(
        None, "--max-rank", help="--format lora: refuse an export whose r exceeds this (the server's max_lora_rank)"
    ),
) -> None:
    """Write the adapter in another library's format, without merging it."""
    from sharelora_cli.outputs.export import export_adapter

    typer.echo(export_adapter(Path(adapter), Path(out), fmt, base, overwrite, rank, max_rank))


@app.command("eval")
def eval_command(
    recipe: str | None = typer.Argument(None, help="recipe whose model, OUTPUT_DIR/adapter and eval section to use"),
    overrides: list[str] | None = OverridesArg,
    recipe_option: str | None = typer.Option(None, "--recipe", help="the recipe, as an option"),
    model: str | None = typer.Option(None, "--model", help="model directory or hub id"),
    adapter: str | None = typer.Option(None, "--adapter", help="adapter directory written by sharelora"),
    no_adapter: bool = typer.Option(
        False,
        "--no-adapter",
        help="evaluate the base model alone: the recipe's, or the one --adapter was trained on",
    ),
    tasks: str | None = typer.Option(None, "--tasks", help="comma-separated: gsm8k,mmlu,humaneval,perplexity"),
    limit: str | None = typer.Option(
        None, "--limit", metavar="N", help="first N examples per task (per subject for MMLU)"
    ),
    batch_size: str | None = typer.Option(None, "--batch-size", help="auto or a number"),
    gsm8k_path: str | None = typer.Option(
        None,
        "--gsm8k-path",
        help="gsm8k: a folder with train.jsonl (shots) and test.jsonl in GSM8K format, or a hub id",
    ),
    data: str | None = typer.Option(
        None, "--data", help="perplexity dataset: .txt/.jsonl/.json/.csv/.parquet or hub id"
    ),
    text_field: str | None = typer.Option(None, "--text-field", help="perplexity: the field holding the text"),
    samples: str | None = typer.Option(None, "--samples", help="score pre-generated HumanEval completions (JSONL)"),
    results_file: str | None = typer.Option(
        None,
        "--json",
        help="results file (default: eval.json with an adapter, eval-base.json without, in the recipe's OUTPUT_DIR "
        "or else beside the --adapter directory; with neither, ./eval-MODEL.json)",
    ),
    num_fewshot: str | None = typer.Option(
        None, "--num-fewshot", metavar="N", help="gsm8k and mmlu: examples shown before each question"
    ),
    max_new_tokens: str | None = typer.Option(
        None, "--max-new-tokens", metavar="N", help="gsm8k and humaneval: tokens generated at most"
    ),
    prompt_format: str | None = typer.Option(
        None,
        "--prompt-format",
        help="gsm8k: harness (lm-eval's Question/Answer prompt) or train (the adapter's training data format, "
        "alpaca or chat); default: eval.prompt_format, harness",
    ),
    allow_code_execution: bool = AllowCodeExecution,
    allow_weak_sandbox: bool = AllowWeakSandbox,
) -> None:
    """Evaluate a model (plus adapter) on GSM8K, MMLU, HumanEval or perplexity; prints a table, writes JSON.

    Without --model or a RECIPE, the model is the base the --adapter was trained on.
    """
    from sharelora_cli.evaluation.results import format_table
    from sharelora_cli.evaluation.runner import EvalRequest, recipe_and_overrides, run_eval

    recipe, overrides = recipe_and_overrides(recipe, recipe_option, overrides or [])
    report = run_eval(
        EvalRequest(
            recipe=recipe, overrides=overrides, model=model, adapter=adapter, no_adapter=no_adapter,
            tasks=tasks, limit=limit, batch_size=batch_size, gsm8k_path=gsm8k_path, data=data, text_field=text_field, samples=samples,
            results_file=results_file, num_fewshot=num_fewshot, max_new_tokens=max_new_tokens, prompt_format=prompt_format,
            allow_code_execution=allow_code_execution, allow_weak_sandbox=allow_weak_sandbox,
        )
    )  # fmt: skip
    typer.echo(format_table(report.results))
    typer.echo(f"results written to {report.results_file}")


@app.command("generate")
def generate_command(
    prompt: str = typer.Option(..., "--prompt", help="the prompt, rendered in the adapter's training format"),
    adapter: str | None = typer.Option(None, "--adapter", help="adapter directory: RUN_DIR/adapter"),
    model: str | None = typer.Option(
        None, "--model", help="base model directory or hub id [default: the adapter's base_model]"
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="most tokens to generate"),
    no_adapter: bool = typer.Option(
        False, "--no-adapter", help="the base alone (its name and the prompt format still come from --adapter)"
    ),
    raw: bool = typer.Option(False, "--raw", help="send the prompt as it is, without the training format"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above 0: sample"),
    top_p: float = typer.Option(1.0, "--top-p", help="sampling: nucleus probability mass"),
    seed: int = typer.Option(0, "--seed", help="sampling: random seed"),
    as_json: bool = typer.Option(
        False, "--json", help="print {prompt, prompt_ids, completion, completion_ids}: the prompt as the model saw it"
    ),
) -> None:
    """Print a trained model's completion of a prompt, rendered in its training format (gsm8k, alpaca, chat)."""
    from dataclasses import asdict

    from sharelora_cli.evaluation.generation import GenerateRequest, generate

    request = GenerateRequest(
        prompt, Path(adapter) if adapter else None, model, max_new_tokens, no_adapter, raw, temperature, top_p, seed
    )
    completion = generate(request)
    typer.echo(json.dumps(asdict(completion), ensure_ascii=False) if as_json else completion.completion)


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
