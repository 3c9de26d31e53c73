"""The `sharelora` command line: parse, call one function per command, print."""

import json
import sys
from typing import Optional

import typer

from sharelora_cli.errors import UserError

app = typer.Typer(
    help="Fine-tune causal LMs with shared low-rank adapters, driven by YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

OverridesArg = typer.Argument(None, help="key=value recipe overrides, e.g. adapter.rank=16 train.max_steps=50")


@app.command("recipes")
def recipes_command() -> None:
    """List the shipped recipes."""
    from sharelora_cli.recipe import find_recipe, shipped_recipes

    for name in shipped_recipes():
        typer.echo(f"{name:<24}{find_recipe(name)}")


@app.command("show")
def show_command(recipe: str = typer.Argument(..., help="recipe path or shipped name"), overrides: Optional[list[str]] = OverridesArg) -> None:
    """Print the fully resolved recipe (defaults, file and overrides merged)."""
    from sharelora_cli.recipe import load_recipe, to_yaml

    typer.echo(to_yaml(load_recipe(recipe, overrides)), nl=False)


@app.command("inspect")
def inspect_command(
    recipe: Optional[str] = typer.Argument(None, help="recipe whose model, rank and targets to use"),
    model: Optional[str] = typer.Option(None, "--model", help="config directory, recipes/models name or hub id"),
    rank: Optional[int] = typer.Option(None, "--rank", help="adapter rank"),
    targets: Optional[str] = typer.Option(None, "--targets", help="comma-separated module types, e.g. q_proj,v_proj"),
    as_json: bool = typer.Option(False, "--json", help="print {method: trainable parameters} as JSON"),
) -> None:
    """Trainable parameters per method for an architecture, built weightless on the meta device."""
    from sharelora_cli.param_counts import count_methods, format_table
    from sharelora_cli.recipe import load_recipe, validate

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
        typer.echo(json.dumps({row.method: row.trainable for row in rows}))
    else:
        typer.echo(format_table(rows))


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
