"""VeRA (Kopiczko et al., 2023, arXiv 2310.11454): ΔW = Λ_b B Λ_d A, with one frozen random pair A, B.

A (r × d_in) and B (d_out × r) are drawn once for the whole model and never trained; each adapted
layer trains only two vectors, d (r) and b (d_out). Layers of different shapes share the pair the
way the paper and PEFT do: A and B are drawn for the largest d_in and d_out among the adapted
layers, and a layer uses the first d_in columns of A and the first d_out rows of B.

The pair is regenerated from adapter.vera.projection_seed rather than saved, by PEFT's rule
(VeraModel with projection_prng_key): a CPU torch.Generator seeded with it draws A, then B, each
Kaiming-uniform with gain √2 on its fan-in, U(−√(6/fan_in), √(6/fan_in)). The same seed and shapes
therefore give PEFT's own vera_A and vera_B. d starts at the constant adapter.vera.d_initial and b at
zero, as in PEFT, so ΔW = 0 before training.

ΔW is a low-rank product with the vectors folded into the factors, A' = Λ_d A and B' = Λ_b B (two
r × d_in and d_out × r scalings per step), so VeRA runs on the fused kernel like every other method
and autograd carries the factors' gradients to d and b. No α/r scaling: the paper and PEFT have none.
"""

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method, SharedTensor

PROJECTIONS = ("vera_A", "vera_B")  # in the order they are drawn


def projection_rule(seed: int) -> str:
    return (
        f"torch.Generator('cpu').manual_seed({seed}) draws vera_A then vera_B, each "
        "kaiming_uniform_(nonlinearity='relu') in float32 (PEFT's VeRA rule)"
    )


class VeraLayer(AdaptedLayer):
    factor_names = ("vera_lambda_d", "vera_lambda_b")
    vera_lambda_d: torch.Tensor
    vera_lambda_b: torch.Tensor
    vera_A: torch.Tensor  # shared by every layer
    vera_B: torch.Tensor

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {"vera_lambda_d": (hyper.rank,), "vera_lambda_b": (d_out,)}

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        if name == "vera_lambda_d":
            nn.init.constant_(tensor, hyper.settings.d_initial)
        else:
            nn.init.zeros_(tensor)

    @staticmethod
    def shared_tensors(dims: list[tuple[int, int]], hyper: Hyper) -> dict[str, SharedTensor]:
        largest_in, largest_out = max(d_in for d_in, _ in dims), max(d_out for _, d_out in dims)
        rule = projection_rule(hyper.settings.projection_seed)
        return {
            "vera_A": SharedTensor((hyper.rank, largest_in), rule),
            "vera_B": SharedTensor((largest_out, hyper.rank), rule),
        }

    @staticmethod
    def init_shared_tensors(tensors: dict[str, torch.Tensor], hyper: Hyper) -> None:
        generator = torch.Generator(device="cpu").manual_seed(hyper.settings.projection_seed)
        for name in PROJECTIONS:
            nn.init.kaiming_uniform_(tensors[name], nonlinearity="relu", generator=generator)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        lora_A = self.vera_lambda_d[:, None] * self.vera_A[:, : self.d_in]
        lora_B = self.vera_lambda_b[:, None] * self.vera_B[: self.d_out]
        return lora_A, lora_B, 1.0


VERA = Method(
    "vera", VeraLayer, summary="one frozen random A, B for the model; per layer d, b: ΔW = Λ_b B Λ_d A", settings="vera"
)
