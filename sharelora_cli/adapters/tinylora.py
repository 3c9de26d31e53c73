"""TinyLoRA (Morris et al., 2026, arXiv 2602.04118): ΔW = B R A with a frozen SVD frame and a tiny trained mixture.

A layer's frozen factors come from the truncated SVD of its own base weight, W ≈ U_r S_r V_rᵀ, with the
singular values split evenly as LoRA-XS does: A = √S_r V_rᵀ (r × d_in), B = U_r √S_r (d_out × r), r =
min(adapter.rank, d_in, d_out). Only the r × r matrix between them trains, and not even that: R = Σᵢ vᵢ Pᵢ
mixes u fixed random matrices Pᵢ (N(0, 1/r) entries, drawn per layer from a CPU generator seeded with
adapter.tinylora.projection_seed + the layer's position among the adapted modules in model order) by a
trained vector v of length u (adapter.tinylora.u). adapter.tinylora.weight_tying shares v between layers:
the model's N adapted modules, in model order, form max(1, round(N·(1 − tying))) runs of consecutive
modules, whatever their type, each run with one v (0: a v per module; 1: one v for the whole model). So
v is one shared tensor (groups × u) and each layer reads its row. All of this is PEFT's TinyLoraConfig,
whose defaults are kept (u = 64, no tying, seed 42, v = 0 so that ΔW = 0); PEFT's r defaults to 2.
No α/r scaling, as in PEFT.

ΔW is a rank-r product, run on the fused kernel as A' = R A and B. A, B and P are frozen and saved with
the adapter (they depend on the base weights, as PEFT's saved buffers do). On a 4-bit base the SVD is of
the dequantised weight, the W the adapted model actually multiplies by, so B A is the best rank-r part
of the base it trains on (and equals what PEFT computes on a full-precision base holding those weights).
"""

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method, SharedTensor, is_conv1d
from sharelora_cli.models.quantization import dequantized_weight


def svd_rank(d_in: int, d_out: int, hyper: Hyper) -> int:
    return min(hyper.rank, d_in, d_out)


def tie_groups(count: int, weight_tying: float) -> int:
    """How many v's `count` adapted modules share (PEFT's rule)."""
    return max(1, round(count * (1.0 - weight_tying)))


def tie_group(index: int, count: int, weight_tying: float) -> int:
    """Which v the index-th of `count` adapted modules reads: runs of count // groups modules, the rest in the last."""
    groups = tie_groups(count, weight_tying)
    return min(index // max(1, count // groups), groups - 1)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight the layer multiplies by, in float32: a 4-bit weight dequantised."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    if getattr(weight, "quant_state", None) is not None:
        return dequantized_weight(layer).float()
    return (weight.t() if is_conv1d(layer) else weight).float()


class TinyLoraLayer(AdaptedLayer):
    factor_names = ("tinylora_A", "tinylora_B", "tinylora_P")
    tinylora_A: torch.Tensor
    tinylora_B: torch.Tensor
    tinylora_P: torch.Tensor
    tinylora_v: torch.Tensor  # shared by every layer: one row per tie group

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        rank = svd_rank(d_in, d_out, hyper)
        return {"tinylora_A": (rank, d_in), "tinylora_B": (d_out, rank), "tinylora_P": (hyper.settings.u, rank, rank)}

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        nn.init.zeros_(tensor)  # place() computes them from the base weight and the layer's position

    @staticmethod
    def frozen_factors(hyper: Hyper) -> frozenset[str]:
        return frozenset(TinyLoraLayer.factor_names)

    @staticmethod
    def shared_tensors(dims: list[tuple[int, int]], hyper: Hyper) -> dict[str, SharedTensor]:
        settings = hyper.settings
        return {"tinylora_v": SharedTensor((tie_groups(len(dims), settings.weight_tying), settings.u))}

    @staticmethod
    def init_shared_tensors(tensors: dict[str, torch.Tensor], hyper: Hyper) -> None:
        nn.init.zeros_(tensors["tinylora_v"])

    def place(self, index: int, count: int) -> None:
        self.tie_group = tie_group(index, count, self.hyper.settings.weight_tying)
        if self.tinylora_A.device.type == "meta":  # a weightless base: the adapter file holds the factors
            return
        rank = self.tinylora_A.shape[0]
        U, S, Vh = torch.linalg.svd(dense_weight(self.base_layer), full_matrices=False)
        root = S[:rank].sqrt()
        generator = torch.Generator().manual_seed(self.hyper.settings.projection_seed + index)
        # 1.0 / rank**0.5, not rank**-0.5: PEFT's expression, whose last bit can differ.
        P = torch.normal(0.0, 1.0 / (rank**0.5), size=tuple(self.tinylora_P.shape), generator=generator)
        with torch.no_grad():
            self.tinylora_A.copy_(root[:, None] * Vh[:rank])
            self.tinylora_B.copy_(U[:, :rank] * root[None])
            self.tinylora_P.copy_(P)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        mixture = torch.einsum("i,ijk->jk", self.tinylora_v[self.tie_group], self.tinylora_P)
        return mixture @ self.tinylora_A, self.tinylora_B, 1.0


TINYLORA = Method(
    "tinylora",
    TinyLoraLayer,
    summary="frozen SVD factors of W; R = Σ vᵢPᵢ of fixed random matrices, v (u) tied across modules: ΔW = B R A",
    settings="tinylora",
)
