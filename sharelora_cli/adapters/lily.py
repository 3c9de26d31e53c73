"""Lily (Zhong et al., 2024, arXiv 2407.09946): A shared by adjacent layers, a pool of B experts mixed by a router.

Per module type: one A (r × d_in) for every `stride_A` adjacent layers, and one pool of num_B experts
B_e (r × d_out each) that every layer of the type reads. Each layer has its own router R (num_B × r):

    hidden = A x,  p = mean over the batch's tokens of softmax(R hidden),  h = W x + s · hidden Σ_e p_e B_e

Semantics, initialisation and defaults are PEFT's LilyConfig: A and R Kaiming-uniform (a = √5, as
nn.Linear), the experts zero so that ΔW = 0 before training, s a plain multiplier (no α/r).

The mixture p is averaged over every token of the batch the layer is applied to, so one example's
output depends on the others in its batch, and there is no single ΔW: Lily is "input_dependent",
`sharelora merge` refuses it, and it runs its own forward rather than the fused low-rank kernel.
Padding enters the average, as in PEFT: an adapted layer sees hidden states, not the attention mask,
and keeping PEFT's rule keeps an exported adapter (PEFT's format) computing exactly what sharelora
trained, padded batches included. A batch without padding is unaffected either way.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method
from sharelora_cli.adapters.low_rank_function import compute_dtype
from sharelora_cli.core.errors import UserError


class LilyLayer(AdaptedLayer):
    factor_names = ("lily_A", "lily_B", "lily_router")
    update_form = "input_dependent"
    lily_A: torch.Tensor  # shared by stride_A adjacent layers of the type
    lily_B: torch.Tensor  # the experts (num_B, r, d_out), shared by every layer of the type
    lily_router: torch.Tensor  # (num_B, r), this layer's own

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        num_b = hyper.settings.num_B
        return {"lily_A": (hyper.rank, d_in), "lily_B": (num_b, hyper.rank, d_out), "lily_router": (num_b, hyper.rank)}

    @staticmethod
    def layer_index(factor: str, layers: int, hyper: Hyper) -> list[int] | None:
        return [i // hyper.settings.stride_A for i in range(layers)] if factor == "lily_A" else None

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        if name == "lily_B":
            nn.init.zeros_(tensor)
        else:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise UserError("lily has no single ΔW: its router mixes the B experts by an average over each batch's tokens")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = compute_dtype(x, self.lily_A)
        hidden = F.linear(self.dropout(x).to(dtype), self.lily_A.to(dtype))
        mixture = F.softmax(F.linear(hidden, self.lily_router.to(dtype)), dim=-1)
        weights = mixture.reshape(-1, mixture.shape[-1]).mean(dim=0)
        expert = torch.einsum("e,ero->ro", weights, self.lily_B.to(dtype))
        delta = (hidden @ expert) * self.hyper.settings.scaling
        return result + delta.to(result.dtype)

    plain_forward = forward


LILY = Method(
    "lily",
    LilyLayer,
    frozenset({"lily_B"}),
    "A per stride of adjacent layers, B experts shared by the type, mixed by a per-layer router",
    settings="lily",
)
