"""Tied-LoRA (Renduchintala et al., 2023, arXiv 2311.09578): ΔW = s · Λ_v B Λ_u A, A and B tied across layers.

Per module type one A (r × d_in) and one B (d_out × r) are used by every layer, as in ShareAB; each
layer adds two scaling vectors, u (r) and v (d_out). The paper's configurations differ in which of
A, B, u, v train and which stay frozen at their initial values: adapter.tied_lora.train names the
trained ones (any non-empty subset, the paper's variants among them). [A, B] alone is ShareAB; [u, v]
alone is VeRA's vector training over tied (per-type, not model-wide) random matrices.

Initialisation (the paper gives no code; these are sharelora's choices): A and B are Kaiming-uniform
like LoRA's A, u and v are ones, and exactly one *trained* factor starts at zero so that ΔW = 0
before training, as LoRA's B = 0 does: v if it trains, else B, else u, else A. Every frozen factor
is then non-zero, so the zeroed factor has a gradient at the first step and the others from the
second. Frozen A and B are saved with the adapter (they are drawn from the training seed's global
RNG, which no rule could replay); they are never counted as trainable nor given to the optimizer.

s is LoRA's α/r (α/√r with rslora). ΔW stays a low-rank product with the vectors folded into the
factors, A' = Λ_u A and B' = Λ_v B, so the fused kernel runs it and autograd reaches u and v.
"""

import math

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method, lora_scaling

FACTORS = {"A": "tied_A", "B": "tied_B", "u": "tied_u", "v": "tied_v"}
# The factor that starts at zero is the first of these that trains.
ZEROED_FIRST = ("v", "B", "u", "A")


def zeroed_factor(hyper: Hyper) -> str:
    return FACTORS[next(name for name in ZEROED_FIRST if name in hyper.settings.train)]


class TiedLoraLayer(AdaptedLayer):
    factor_names = tuple(FACTORS.values())
    tied_A: torch.Tensor
    tied_B: torch.Tensor
    tied_u: torch.Tensor
    tied_v: torch.Tensor

    def __init__(self, base_layer: nn.Module, factors: dict[str, nn.Parameter], hyper: Hyper):
        super().__init__(base_layer, factors, hyper)
        self.scaling = lora_scaling(hyper)

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {
            "tied_A": (hyper.rank, d_in),
            "tied_B": (d_out, hyper.rank),
            "tied_u": (hyper.rank,),
            "tied_v": (d_out,),
        }

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        if name == zeroed_factor(hyper):
            nn.init.zeros_(tensor)
        elif name in ("tied_A", "tied_B"):
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        else:
            nn.init.ones_(tensor)

    @staticmethod
    def frozen_factors(hyper: Hyper) -> frozenset[str]:
        return frozenset(factor for name, factor in FACTORS.items() if name not in hyper.settings.train)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.tied_u[:, None] * self.tied_A, self.tied_v[:, None] * self.tied_B, self.scaling


TIED_LORA = Method(
    "tied-lora",
    TiedLoraLayer,
    frozenset({"tied_A", "tied_B"}),
    "A, B tied per module type; per layer u, v: ΔW = s Λ_v B Λ_u A",
    settings="tied_lora",
)
