"""RandLoRA (Albert et al., 2025, arXiv 2502.00987): a full-rank ΔW from shared frozen random bases.

The model has one frozen pair of random bases, drawn for its largest layer (as VeRA's pair):
randlora_A (r, 1, min_dim) and randlora_B (max_dim, n_max, r), r = adapter.rank (the basis rank,
PEFT's r), n = ⌈min(d_in, d_out)/r⌉ bases so that n·r ≥ min(d_in, d_out). Each layer trains two
scalings: λ (r × n), one per basis and rank, and γ (n × min(d_in, d_out)), one diagonal per basis,
applied on the layer's smaller side. With a = A[:, :, :min] and b = B[:max, :n]:

    U = (λ[:, :, None] · a · γ[None]) flattened to (r·n, min)   — row k·n + j
    V = b flattened to (max, n·r)                               — column j·r + k
    ΔW = s · V U  (d_in ≤ d_out),   s · Uᵀ Vᵀ  (d_in > d_out),    s = α/r

U's rows and V's columns are paired in those two orders, not basis by basis: that is PEFT's layout,
kept so that the same seed, λ and γ give PEFT's ΔW. The inner dimension n·r is at least the smaller
side, so ΔW is full rank in general (update_form "full_rank": a LoRA export truncates its SVD), yet the
forward still runs as a product of two thin factors, on the fused kernel like every other method.

The bases are regenerated from adapter.randlora.projection_seed, never saved, by PEFT's rule
(RandLoraModel._init_randlora_A_randlora_B, the dense variant): a CPU torch.Generator seeded with it
draws A then B's n_max bases one after another, each Kaiming-uniform (a = √5) in bfloat16, and each
tensor is divided by its own standard deviation (in bfloat16) before it becomes float32. λ starts at
zero (ΔW = 0) and γ at 1/max(n, min(d_in, d_out)), as in PEFT. Trainable per module: n·(r + min(d_in, d_out)).
"""

import math

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method, SharedTensor, lora_scaling

BASES = ("randlora_A", "randlora_B")  # in the order they are drawn


def num_bases(d_in: int, d_out: int, rank: int) -> int:
    """n = ⌈min(d_in, d_out)/r⌉: enough rank-r bases for a full-rank ΔW."""
    return math.ceil(min(d_in, d_out) / rank)


def basis_rule(seed: int) -> str:
    return (
        f"torch.Generator('cpu').manual_seed({seed}) draws randlora_A then each basis of randlora_B, "
        "kaiming_uniform_(a=sqrt(5)) in bfloat16, each tensor divided by its std (PEFT's RandLoRA rule)"
    )


def draw_basis(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    # PEFT draws in bfloat16 wherever accelerate reports bf16 support (every CPU; CUDA GPUs from Ampere on), float16
    # elsewhere; sharelora always draws in bfloat16, so its bases are PEFT's on those machines, and the same everywhere.
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


class RandLoraLayer(AdaptedLayer):
    factor_names = ("randlora_lambda", "randlora_gamma")
    update_form = "full_rank"
    randlora_lambda: torch.Tensor
    randlora_gamma: torch.Tensor
    randlora_A: torch.Tensor  # shared by every layer
    randlora_B: torch.Tensor

    def __init__(self, base_layer: nn.Module, factors: dict[str, nn.Parameter], hyper: Hyper):
        super().__init__(base_layer, factors, hyper)
        self.scaling = lora_scaling(hyper)
        self.num_bases = num_bases(self.d_in, self.d_out, hyper.rank)

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        bases = num_bases(d_in, d_out, hyper.rank)
        return {"randlora_lambda": (hyper.rank, bases), "randlora_gamma": (bases, min(d_in, d_out))}

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        if name == "randlora_lambda":
            nn.init.zeros_(tensor)
        else:
            nn.init.constant_(tensor, 1 / max(tensor.shape))

    @staticmethod
    def shared_tensors(dims: list[tuple[int, int]], hyper: Hyper) -> dict[str, SharedTensor]:
        # PEFT sizes the pair by the largest d_out and largest d_in, whichever layers they come from.
        largest_in, largest_out = max(d_in for d_in, _ in dims), max(d_out for _, d_out in dims)
        small, large = min(largest_in, largest_out), max(largest_in, largest_out)
        rule = basis_rule(hyper.settings.projection_seed)
        return {
            "randlora_A": SharedTensor((hyper.rank, 1, small), rule),
            "randlora_B": SharedTensor((large, num_bases(small, large, hyper.rank), hyper.rank), rule),
        }

    @staticmethod
    def init_shared_tensors(tensors: dict[str, torch.Tensor], hyper: Hyper) -> None:
        generator = torch.Generator(device="cpu").manual_seed(hyper.settings.projection_seed)
        basis_A = draw_basis(tuple(tensors["randlora_A"].shape), generator)
        large, bases, rank = tensors["randlora_B"].shape
        basis_B = torch.cat([draw_basis((large, 1, rank), generator) for _ in range(bases)], dim=1)
        for name, basis in zip(BASES, (basis_A, basis_B)):
            tensors[name].copy_(basis / basis.std())

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        small, large, bases = min(self.d_in, self.d_out), max(self.d_in, self.d_out), self.num_bases
        scaled = self.randlora_lambda[:, :, None] * self.randlora_A[:, :, :small] * self.randlora_gamma[None]
        thin = scaled.flatten(end_dim=1)  # (r·n, small)
        wide = self.randlora_B[:large, :bases].flatten(start_dim=1)  # (large, n·r)
        if self.d_in <= self.d_out:
            return thin, wide, self.scaling
        return wide.t(), thin.t(), self.scaling


RANDLORA = Method(
    "randlora",
    RandLoraLayer,
    summary="one frozen pair of random bases for the model; per layer λ, γ scale them into a full-rank ΔW",
    settings="randlora",
)
