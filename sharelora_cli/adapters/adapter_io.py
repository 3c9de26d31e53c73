"""Save and load an adapter on its own: safetensors for the tensors, JSON for what built them."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sharelora_cli.adapters.inject import inject_adapter, planned_regenerated_record, tensor_shapes
from sharelora_cli.adapters.plan import Adapter
from sharelora_cli.adapters.sharded_values import placed_like
from sharelora_cli.config.recipe import AdapterConfig, validate
from sharelora_cli.core.atomic import atomic_directory
from sharelora_cli.core.errors import UserError, first_line

CONFIG_FILE = "sharelora_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT_VERSION = 1


def save_adapter(adapter: Adapter, directory: Path, base_model: str | None = None, extra: dict | None = None) -> None:
    """Write DIR/sharelora_config.json and DIR/adapter.safetensors atomically (replacing DIR)."""
    config = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "adapter": adapter.config.model_dump(),
        "trainable_parameters": adapter.num_trainable(),
        "plan": adapter.plan(),
        **({"regenerated": adapter.regenerated_record()} if adapter.regenerated else {}),
        **(extra or {}),
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter.named_tensors().items()}
    with atomic_directory(Path(directory), replace=True) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(directory: Path) -> dict:
    """The saved JSON config, checked for the keys every loader needs."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        inner = Path(directory) / "adapter"
        if (inner / CONFIG_FILE).is_file():  # a run's OUTPUT_DIR or a checkpoint-N: the adapter is inside
            raise UserError(f"{directory} is a run or checkpoint directory, not an adapter: use --adapter {inner}")
        raise UserError(f"{path} not found: --adapter must be a directory written by sharelora (train or save)")
    try:
        config = json.loads(path.read_text())
        tensor_shapes(validate({"adapter": config["adapter"]}, source=str(path)).adapter, config["plan"])
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError, ValueError) as err:
        raise UserError(
            f"{path} is corrupt or not a sharelora adapter config ({type(err).__name__}: {first_line(err)})"
        ) from None
    return config


def read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: the adapter directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is corrupt or truncated ({err}); retrain or restore it from a checkpoint") from None


def load_adapter(model: nn.Module, directory: Path) -> Adapter:
    """Inject the saved adapter into model and load its tensors; bad files fail before model is touched."""
    config = read_adapter_config(directory)
    adapter_config, tensors = read_checked_tensors(directory, config)
    adapter = inject_adapter(model, adapter_config, plan=config["plan"])
    copy_tensors(adapter, tensors)
    return adapter


def copy_tensors(adapter: Adapter, tensors: dict[str, torch.Tensor]) -> None:
    """Set every distinct tensor of the adapter from saved tensors of the same names (checked by the caller)."""
    with torch.no_grad():
        for name, param in adapter.named_tensors().items():
            param.copy_(placed_like(tensors[name], param))


def check_regenerated(current: dict[str, dict], config: dict, source: Path) -> None:
    """Regenerated shared tensors (VeRA's A, B; `current` is their record) must be bit for bit those recorded in config."""
    recorded = config.get("regenerated", {})
    for name, now in current.items():
        if recorded.get(name) != now:
            raise UserError(
                f"{source}: the regenerated tensor {name} differs from the one this adapter was trained with "
                f"(recorded {recorded.get(name)}, regenerated {now}); load it with the sharelora and torch "
                "versions that trained it"
            )


def read_checked_tensors(directory: Path, config: dict) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The adapter settings of a config (from read_adapter_config) and its tensors, whose names and
    shapes are checked against the plan, and regenerated tensors against their record, before anything uses them."""
    adapter_config = AdapterConfig.model_validate(config["adapter"])
    tensors = read_adapter_tensors(directory)
    check_tensors(tensors, tensor_shapes(adapter_config, config["plan"]), Path(directory) / WEIGHTS_FILE)
    check_regenerated(planned_regenerated_record(adapter_config, config["plan"]), config, Path(directory) / CONFIG_FILE)
    return adapter_config, tensors


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    """Names and shapes of saved tensors must be exactly those the plan implies."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
