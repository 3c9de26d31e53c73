"""`sharelora export`: write a saved adapter as a standard PEFT adapter directory.

`--format lora` writes every method as one plain LoRA (outputs/lora_export.py), the form serving engines load.
`--format peft` writes each method in PEFT's own format where it has one:

Every LoRA-family method (its layer is a LoraLayer: lora, sharea, shareb, shareab, and any
method with its own sharing plan) is exactly a per-layer LoRA: each module gets the A and B
its plan points at, so a shared factor is written out once per layer that uses it.
MiSS maps onto PEFT's MiSS (`MissConfig`, `miss_block` = our D, same forward: the input's
rank-sized chunks summed, times D); PEFT's MiSS adapts nn.Linear only, with rank <= d_in,
so other MiSS adapters are refused with a pointer to `sharelora merge`.
VeRA maps onto PEFT's VeRA (same names; the shared pair written once, as PEFT's save_projection
does) and VB-LoRA onto PEFT's VB-LoRA (same names; the bank written once), RandLoRA onto PEFT's
RandLoRA (same names; the bases written once, and α such that PEFT's α/r is our scaling), TinyLoRA onto
PEFT's TinyLoRA (same names; A, B, P per layer, each tie group's v once). Tied-LoRA has no PEFT
format: it is refused with a pointer to `sharelora merge`. Lily maps onto PEFT's Lily, whose shared A
and experts are one module in many layers and so saved under every layer's name, as here. UniLoRA maps
onto PEFT's UniLoRA: the vector alone, PEFT regenerating the same assignment from proj_seed.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from sharelora_cli.adapters.adapter_io import read_adapter_config
from sharelora_cli.adapters.base import AdaptedLayer, is_conv1d
from sharelora_cli.adapters.lily import LilyLayer
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.adapters.miss import MissLayer
from sharelora_cli.adapters.randlora import BASES, RandLoraLayer
from sharelora_cli.adapters.tinylora import TinyLoraLayer
from sharelora_cli.adapters.unilora import UniLoraLayer
from sharelora_cli.adapters.vblora import VBLoraLayer
from sharelora_cli.adapters.vera import VeraLayer
from sharelora_cli.core.atomic import atomic_directory
from sharelora_cli.core.errors import UserError
from sharelora_cli.models.loading import load_config
from sharelora_cli.outputs.conversion import SavedAdapter, base_model_name, check_output_dir, load_on_meta
from sharelora_cli.outputs.lora_export import KEY_PREFIX, REPORT_FILE, lora_export

FORMATS = ("peft", "lora")


def export_adapter(
    adapter_dir: Path,
    out: Path,
    fmt: str = "peft",
    base: str | None = None,
    overwrite: bool = False,
    rank: int | None = None,
    max_rank: int | None = None,
) -> str:
    """Write out/adapter_config.json and out/adapter_model.safetensors atomically; returns the summary to print.

    rank: the SVD rank of full-rank updates (--format lora; default the adapter's rank); max_rank: the
    largest r a --format lora export may have.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    if fmt != "lora" and (rank is not None or max_rank is not None):
        raise UserError("--rank and --max-rank apply to --format lora only")
    for flag, value in (("--rank", rank), ("--max-rank", max_rank)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    adapter_dir, out = Path(adapter_dir), Path(out)
    config = read_adapter_config(adapter_dir)
    base_name = base_model_name(config, base)
    check_output_dir(out, overwrite, adapter_dir)
    saved = load_on_meta(adapter_dir, config, load_config(base_name, key="--base"))
    layers = saved.layers()
    if fmt == "lora":
        return _export_lora(saved, layers, out, base_name, overwrite, rank, max_rank)
    writer = _writer(layers)
    if writer is None:
        raise UserError(f"method '{saved.adapter.config.method}' has no PEFT format: use `sharelora merge` instead")
    tensors, peft_config = writer(saved, layers)
    peft_config["base_model_name_or_path"] = base_name
    with atomic_directory(out, replace=overwrite) as staging:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return f"exported {len(layers)} {saved.adapter.config.method} modules as a PEFT {peft_config['peft_type']} adapter -> {out}"


def _export_lora(
    saved: SavedAdapter,
    layers: dict[str, AdaptedLayer],
    out: Path,
    base_name: str,
    overwrite: bool,
    rank: int | None,
    max_rank: int | None,
) -> str:
    exported = lora_export(layers, rank or saved.adapter.config.rank, max_rank)
    peft_config = exported.config | {"base_model_name_or_path": base_name}
    with atomic_directory(out, replace=overwrite) as staging:
        save_file(exported.tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        (staging / REPORT_FILE).write_text(json.dumps(exported.report, indent=2) + "\n")
    return (
        f"exported {len(layers)} {saved.adapter.config.method} modules as a PEFT LORA adapter "
        f"(r={exported.rank}) -> {out}\n{exported.summary()}"
    )


def _writer(layers: dict[str, AdaptedLayer]):
    """The PEFT writer for the layers' type (see WRITERS), or None when PEFT has no format for it."""
    for layer_cls, write in WRITERS.items():
        if all(isinstance(layer, layer_cls) for layer in layers.values()):
            return write
    return None


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
        "fan_in_fan_out": _has_conv1d(layers),
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


def _vera(saved: SavedAdapter, layers: dict[str, VeraLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = _layer_factors(layers)
    # PeftModel keeps the pair on its VeraModel ("base_model"), once for all layers.
    tensors |= {f"base_model.{name}": saved.adapter.shared[name].detach().clone() for name in ("vera_A", "vera_B")}
    adapter = saved.adapter.config
    config = _common_config("VERA", layers) | {
        "r": adapter.rank,
        "projection_prng_key": adapter.vera.projection_seed,
        "save_projection": True,
        "vera_dropout": adapter.dropout,
        "d_initial": adapter.vera.d_initial,
        "fan_in_fan_out": _has_conv1d(layers),
        "init_weights": True,
    }
    return tensors, config


def _vblora(saved: SavedAdapter, layers: dict[str, VBLoraLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = _layer_factors(layers)
    tensors["base_model.vblora_vector_bank"] = saved.adapter.shared["vblora_vector_bank"].detach().clone()
    adapter = saved.adapter.config
    config = _common_config("VBLORA", layers) | {
        "r": adapter.rank,
        "num_vectors": adapter.vblora.num_vectors,
        "vector_length": adapter.vblora.vector_length,
        "topk": adapter.vblora.topk,
        "save_only_topk_weights": False,
        "vblora_dropout": adapter.dropout,
        "init_vector_bank_bound": adapter.vblora.init_vector_bank_bound,
        "init_logits_std": adapter.vblora.init_logits_std,
        "fan_in_fan_out": _has_conv1d(layers),
    }
    return tensors, config


def _lily(saved: SavedAdapter, layers: dict[str, LilyLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    for path, layer in layers.items():
        if is_conv1d(layer.base_layer):
            raise UserError(f"PEFT's Lily adapts nn.Linear only, not the Conv1D '{path}': it has no PEFT format")
    tensors = {}
    for path, layer in layers.items():
        # PEFT's experts are one nn.Linear(d_out, num_B·r) weight, read as (num_B, r, d_out).
        tensors[f"{KEY_PREFIX}{path}.lily_A.weight"] = layer.lily_A.detach().clone()
        tensors[f"{KEY_PREFIX}{path}.lily_B.weight"] = layer.lily_B.detach().reshape(-1, layer.d_out).clone()
        tensors[f"{KEY_PREFIX}{path}.lily_router.weight"] = layer.lily_router.detach().clone()
    adapter = saved.adapter.config
    config = _common_config("LILY", layers) | {
        "r": adapter.rank,
        "stride_A": adapter.lily.stride_A,
        "num_B": adapter.lily.num_B,
        "scaling": adapter.lily.scaling,
        "init_weights": True,
    }
    return tensors, config


def _unilora(saved: SavedAdapter, layers: dict[str, UniLoraLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"base_model.unilora_theta_d": saved.adapter.shared["unilora_theta_d"].detach().clone()}
    adapter = saved.adapter.config
    config = _common_config("UNILORA", layers) | {
        "r": adapter.rank,
        "theta_d_length": adapter.unilora.vector_length,
        # PEFT assigns the indices in model order over the adapted modules, as sharelora does: the same ones.
        "proj_seed": adapter.unilora.projection_seed,
        "save_indices": False,
        "init_theta_d_bound": adapter.unilora.init_bound,
        "unilora_dropout": adapter.dropout,
        "fan_in_fan_out": _has_conv1d(layers),
        "init_weights": True,
    }
    return tensors, config


def _randlora(saved: SavedAdapter, layers: dict[str, RandLoraLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = _layer_factors(layers)
    tensors |= {f"base_model.{name}": saved.adapter.shared[name].detach().clone() for name in BASES}
    adapter = saved.adapter.config
    scaling = next(iter(layers.values())).scaling
    config = _common_config("RANDLORA", layers) | {
        "r": adapter.rank,
        "projection_prng_key": adapter.randlora.projection_seed,
        "save_projection": True,
        "sparse": False,
        "very_sparse": False,
        "randlora_dropout": adapter.dropout,
        # PEFT scales by randlora_alpha / r, also where our scaling is rsLoRA's α/√r.
        "randlora_alpha": scaling * adapter.rank,
        "fan_in_fan_out": _has_conv1d(layers),
        "init_weights": True,
    }
    return tensors, config


def _tinylora(saved: SavedAdapter, layers: dict[str, TinyLoraLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = _layer_factors(layers)
    # PEFT keeps one v per tie group on its TinyLoraModel, keyed by the group's number.
    tensors |= {
        f"base_model.tinylora_v.{k}": v.detach().clone() for k, v in enumerate(saved.adapter.shared["tinylora_v"])
    }
    adapter = saved.adapter.config
    config = _common_config("TINYLORA", layers) | {
        "r": adapter.rank,
        "u": adapter.tinylora.u,
        "weight_tying": adapter.tinylora.weight_tying,
        "projection_seed": adapter.tinylora.projection_seed,
        "save_projection": True,
        "tinylora_dropout": adapter.dropout,
        "fan_in_fan_out": _has_conv1d(layers),
        "init_weights": True,
    }
    return tensors, config


def _layer_factors(layers: Mapping[str, AdaptedLayer]) -> dict[str, torch.Tensor]:
    """Every layer's own factors under PEFT's key for them (the same attribute names)."""
    return {
        f"{KEY_PREFIX}{path}.{name}": getattr(layer, name).detach().clone()
        for path, layer in layers.items()
        for name in layer.factor_names
    }


def _has_conv1d(layers: Mapping[str, AdaptedLayer]) -> bool:
    return any(is_conv1d(layer.base_layer) for layer in layers.values())


# Layer type -> its PEFT writer; every adapted layer must be of one type.
WRITERS = {
    LoraLayer: _lora,
    MissLayer: _miss,
    VeraLayer: _vera,
    VBLoraLayer: _vblora,
    LilyLayer: _lily,
    UniLoraLayer: _unilora,
    RandLoraLayer: _randlora,
    TinyLoraLayer: _tinylora,
}


def _common_config(peft_type: str, layers: Mapping[str, AdaptedLayer]) -> dict:
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        # Full module paths match exactly the modules the plan adapted, whatever selected them.
        "target_modules": list(layers),
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
    }
