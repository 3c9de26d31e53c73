"""`sharelora export --format peft`: write a saved adapter as a standard PEFT adapter directory.

Every LoRA-family method (its layer is a LoraLayer: lora, sharea, shareb, shareab, and any
method with its own sharing plan) is exactly a per-layer LoRA: each module gets the A and B
its plan points at, so a shared factor is written out once per layer that uses it.
MiSS maps onto PEFT's MiSS (`MissConfig`, `miss_block` = our D, same forward: the input's
rank-sized chunks summed, times D); PEFT's MiSS adapts nn.Linear only, with rank <= d_in,
so other MiSS adapters are refused with a pointer to `sharelora merge`.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sharelora_cli.adapter_io import read_adapter_config
from sharelora_cli.adapters.base import AdaptedLayer, is_conv1d
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.adapters.miss import MissLayer
from sharelora_cli.atomic import atomic_directory
from sharelora_cli.conversion import SavedAdapter, base_model_name, check_output_dir, load_on_meta
from sharelora_cli.errors import UserError
from sharelora_cli.modeling import load_config

FORMATS = ("peft",)
# PeftModelForCausalLM's key prefix; PEFT drops the adapter name ("default") from saved keys.
KEY_PREFIX = "base_model.model."


def export_adapter(adapter_dir: Path, out: Path, fmt: str = "peft", base: str | None = None,
                   overwrite: bool = False) -> str:
    """Write out/adapter_config.json and out/adapter_model.safetensors atomically; returns a summary line."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    adapter_dir, out = Path(adapter_dir), Path(out)
    config = read_adapter_config(adapter_dir)
    base_name = base_model_name(config, base)
    check_output_dir(out, overwrite, adapter_dir)
    saved = load_on_meta(adapter_dir, config, load_config(base_name, key="--base"))
    layers = saved.layers()
    if all(isinstance(layer, LoraLayer) for layer in layers.values()):
        tensors, peft_config = _lora(saved, layers)
    elif all(isinstance(layer, MissLayer) for layer in layers.values()):
        tensors, peft_config = _miss(saved, layers)
    else:
        raise UserError(f"method '{saved.adapter.config.method}' has no PEFT format: use `sharelora merge` instead")
    peft_config["base_model_name_or_path"] = base_name
    with atomic_directory(out, replace=overwrite) as staging:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return f"exported {len(layers)} {saved.adapter.config.method} modules as a PEFT {peft_config['peft_type']} adapter -> {out}"


def _lora(saved: SavedAdapter, layers: dict[str, LoraLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for path, layer in layers.items():
        # A shared factor is one tensor in many layers; safetensors wants each key to own its storage.
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A.detach().clone()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B.detach().clone()
    adapter = saved.adapter.config
    config = _common_config("LORA", layers) | {
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "use_rslora": adapter.rslora,
        # Only PEFT's merge reads this: GPT-2's Conv1D stores the weight transposed.
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for layer in layers.values()),
        "init_lora_weights": True,
    }
    return tensors, config


def _miss(saved: SavedAdapter, layers: dict[str, MissLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    adapter = saved.adapter.config
    for path, layer in layers.items():
        if is_conv1d(layer.base_layer) or adapter.rank > layer.d_in:
            reason = "a Conv1D layer" if is_conv1d(layer.base_layer) else f"rank {adapter.rank} > d_in {layer.d_in}"
            raise UserError(f"PEFT's MiSS cannot hold '{path}' ({reason}): use `sharelora merge` instead")
    tensors = {f"{KEY_PREFIX}{path}.miss_block": layer.miss_D.detach().clone() for path, layer in layers.items()}
    config = _common_config("MISS", layers) | {
        "r": adapter.rank,
        "miss_dropout": adapter.dropout,
        "mini_r": 1,
        "init_weights": True,  # the plain MiSS forward; "bat" and "mini" are other methods
    }
    return tensors, config


def _common_config(peft_type: str, layers: dict[str, AdaptedLayer]) -> dict:
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        # Full module paths match exactly the modules the plan adapted, whatever selected them.
        "target_modules": list(layers),
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
    }
