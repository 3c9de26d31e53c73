"""`sharelora export --format lora`: any method as one plain per-layer LoRA, the form serving engines load.

vLLM and SGLang serve PEFT LoRA adapters with one `r` and one `lora_alpha`, standard lora_A/lora_B keys,
no `rank_pattern`, no `modules_to_save` (docs/serving.md). Each layer says what its ΔW is
(`AdaptedLayer.update_form`), and that alone decides how it is written, so nothing here names a method:
- low_rank: `low_rank()` gives (A, B, s) with ΔW = s·B A exactly (shared factors, MiSS's fixed chunk-sum
  matrix, VeRA's and Tied-LoRA's scaling vectors, VB-LoRA's bank mixtures are all folded in by the method);
  s is folded into B, and lora_alpha = r makes PEFT's scaling exactly 1.
- full_rank: only `delta_weight()`; its SVD truncated at --rank gives the closest rank-r factors in Frobenius
  norm (Eckart–Young), and each layer's relative error is written to sharelora_export.json and printed.
- input_dependent: no single ΔW exists, so no LoRA can hold it: refused.
The export's r is the largest layer rank; the others are zero-padded, which adds nothing to B A.
"""

from dataclasses import dataclass

import torch

from sharelora_cli.adapters.base import AdaptedLayer, is_conv1d
from sharelora_cli.core.errors import UserError

# PeftModelForCausalLM's key prefix; PEFT drops the adapter name ("default") from saved keys.
KEY_PREFIX = "base_model.model."
REPORT_FILE = "sharelora_export.json"


@dataclass(frozen=True)
class LayerLora:
    """One layer's ΔW as B A (scaling 1): A (rank × d_in), B (d_out × rank), float32."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    form: str
    # ‖ΔW − B A‖_F / ‖ΔW‖_F for a truncated full-rank update; None where B A is ΔW up to rounding.
    relative_error: float | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def layer_lora(path: str, layer: AdaptedLayer, svd_rank: int) -> LayerLora:
    """The LoRA factors of one adapted layer, exact or truncated as its update_form allows."""
    form = type(layer).update_form
    if form == "low_rank":
        lora_A, lora_B, scaling = layer.low_rank()
        return LayerLora(lora_A.detach().float().contiguous(), (lora_B.detach().float() * scaling).contiguous(), form)
    if form == "full_rank":
        return truncated_svd(layer.delta_weight().detach(), svd_rank)
    raise UserError(
        f"'{path}' has an input-dependent update (no single ΔW): it cannot be written as a LoRA; "
        "serve the adapter with sharelora instead"
    )


def truncated_svd(delta: torch.Tensor, rank: int) -> LayerLora:
    """The best rank-`rank` factors of ΔW (d_out × d_in), and their relative Frobenius error."""
    exact = delta.double()
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    # Splitting √S between the factors keeps both on the scale of ΔW's square root.
    root = S[:rank].sqrt()
    lora_A, lora_B = (root[:, None] * Vh[:rank]).float(), (U[:, :rank] * root).float()
    norm = float(torch.linalg.matrix_norm(exact))
    error = float(torch.linalg.matrix_norm(exact - lora_B.double() @ lora_A.double())) / norm if norm > 0 else 0.0
    return LayerLora(lora_A.contiguous(), lora_B.contiguous(), "full_rank", error)


def padded(factors: LayerLora, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with zero rows of A and zero columns of B up to `rank`: B A unchanged."""
    extra = rank - factors.rank
    lora_A = torch.cat([factors.lora_A, factors.lora_A.new_zeros(extra, factors.lora_A.shape[1])])
    lora_B = torch.cat([factors.lora_B, factors.lora_B.new_zeros(factors.lora_B.shape[0], extra)], dim=1)
    return lora_A, lora_B


@dataclass(frozen=True)
class LoraExport:
    tensors: dict[str, torch.Tensor]
    config: dict
    report: dict

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    def summary(self) -> str:
        """Printed after the export: the truncation error of the full-rank layers, when there are any."""
        errors = {path: e["relative_error"] for path, e in self.report["modules"].items() if e["form"] == "full_rank"}
        if not errors:
            return f"exact: every module's ΔW is B A (r={self.rank}, lora_alpha={self.rank}, scaling 1)"
        worst = max(errors, key=lambda path: errors[path])
        mean = sum(errors.values()) / len(errors)
        return (
            f"truncated SVD at rank {self.report['svd_rank']} for {len(errors)} full-rank modules: relative "
            f"Frobenius error max {errors[worst]:.3e} ({worst}), mean {mean:.3e} (per module in {REPORT_FILE})"
        )


def lora_export(layers: dict[str, AdaptedLayer], svd_rank: int, max_rank: int | None) -> LoraExport:
    """Every adapted layer as PEFT LoRA tensors with one r; refuses an r above max_rank."""
    factors = {path: layer_lora(path, layer, svd_rank) for path, layer in layers.items()}
    rank = max(f.rank for f in factors.values())
    if max_rank is not None and rank > max_rank:
        raise UserError(
            f"the LoRA export needs r = {rank}, above --max-rank {max_rank}: raise --max-rank (vLLM's "
            "max_lora_rank), lower --rank for full-rank updates, or train with a smaller adapter.rank"
        )
    tensors = {}
    for path, layer_factors in factors.items():
        lora_A, lora_B = padded(layer_factors, rank)
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = lora_A
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = lora_B
    report = {
        "r": rank,
        "svd_rank": svd_rank,
        "modules": {
            path: {"form": f.form, "rank": f.rank, "relative_error": f.relative_error} for path, f in factors.items()
        },
    }
    return LoraExport(tensors, lora_config(layers, rank), report)


def lora_config(layers: dict[str, AdaptedLayer], rank: int) -> dict:
    """A LoraConfig with one r and scaling lora_alpha / r = 1: the safe form for serving engines."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # Full module paths match exactly the modules the plan adapted, whatever selected them.
        "target_modules": list(layers),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        # Only PEFT's merge reads this: GPT-2's Conv1D stores the weight transposed.
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for layer in layers.values()),
        "init_lora_weights": True,
        "inference_mode": True,
    }
