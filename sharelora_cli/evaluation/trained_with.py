"""What an adapter was trained with, for evaluating it without a recipe: its base model (and its quantization)
and its data format.

`sharelora train` records them in the adapter's sharelora_config.json (base_model, quantization, data_format);
for an adapter written before one was recorded, the recipe.yaml its run wrote beside it says the rest.
"""

from pathlib import Path

import yaml

from sharelora_cli.adapters.adapter_io import read_adapter_config
from sharelora_cli.core.errors import UserError


def base_model(adapter: Path) -> str:
    """The base model the adapter was trained on."""
    name = recorded(adapter, "base_model", ("model", "name_or_path"))
    if not name:
        raise UserError(f"--adapter {adapter} records no base model: pass --model PATH_OR_ID")
    return name


def data_format(adapter: Path, remedy: str) -> str:
    """The data.format the adapter was trained on (gsm8k, alpaca, chat or text); remedy: what to do without one."""
    fmt = recorded(adapter, "data_format", ("data", "format"))
    if not fmt:
        raise UserError(f"{adapter} records no training data format, nor is there a recipe.yaml beside it: {remedy}")
    return fmt


def quantization(adapter: Path) -> dict | None:
    """The 4-bit quantization the base was loaded with in training (None: full precision)."""
    config = read_adapter_config(adapter)
    settings = config["quantization"] if "quantization" in config else run_recipe(adapter).get("quantization")
    return settings if isinstance(settings, dict) and settings.get("load_in_4bit") else None


def recorded(adapter: Path, key: str, recipe_key: tuple[str, str]) -> str | None:
    """The adapter config's `key`, else that setting of the run's recipe.yaml beside the adapter."""
    value = read_adapter_config(adapter).get(key)
    if value:
        return value
    section = run_recipe(adapter).get(recipe_key[0])
    return section.get(recipe_key[1]) if isinstance(section, dict) else None


def run_recipe(adapter: Path) -> dict:
    """The recipe.yaml `sharelora train` wrote beside OUTPUT_DIR/adapter, as plain values ({} if there is none)."""
    path = Path(adapter).parent / "recipe.yaml"
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # a damaged run file only loses this fallback; the adapter's own record comes first
    return values if isinstance(values, dict) else {}
