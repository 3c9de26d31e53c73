"""UniLoRA (Li et al., 2025, arXiv 2506.00799): every LoRA entry of the model reads one trainable vector θ.

The model's LoRA factors, every layer's A (r × d_in) then B (d_out × r) in model order, flattened, form
D entries; each entry is assigned a fixed index into θ (vector_length entries) and a fixed scale, and
ΔW = B A with A[i, j] = θ[index_A[i, j]] · scale_A[i, j] (likewise B). No α/r scaling, as in PEFT.

The assignment is PEFT's (UniLoraModel.generate_index), so the same projection_seed gives PEFT's own
indices: every index of θ appears ⌊D/length⌋ times, `D mod length` distinct ones (numpy
default_rng(seed).choice without replacement) once more, and the whole is shuffled by the same
generator. An entry's scale is 1/√(how many entries share its index), which keeps θ's gradient
entries on one scale however many entries each feeds.

The assignment is a regenerated shared tensor (like VeRA's pair): drawn from the seed at every
injection, never saved, its SHA-256 recorded in the adapter config so that a load under another numpy
(whose generator streams may change between versions) refuses rather than computing another ΔW. It
holds the indices as float32, exact below 2^24 (vector_length's limit): 4 bytes per LoRA entry, and the
only copy, since each layer reads its A's and B's slices of it (at an offset) at every call and looks
their scales up in a table of vector_length entries. θ is drawn U(−init_bound, init_bound) from the
global RNG, trained and saved. ΔW is a low-rank product, so UniLoRA runs on the fused kernel and merges.
"""

from typing import cast

import numpy as np
import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method, SharedTensor


def balanced_assignment(entries: int, length: int, seed: int) -> torch.Tensor:
    """`entries` indices into a vector of `length`, each used ⌊entries/length⌋ or one more times, shuffled by seed."""
    rng = np.random.default_rng(seed)
    indices = np.repeat(np.arange(length), entries // length)
    if entries % length:
        indices = np.concatenate([indices, rng.choice(length, size=entries % length, replace=False)])
    rng.shuffle(indices)
    return torch.as_tensor(indices, dtype=torch.long)


def assignment_rule(seed: int) -> str:
    return (
        f"numpy.random.default_rng({seed}): every index vector_length-many times floor(D/vector_length), "
        "choice(vector_length, D mod vector_length, replace=False) once more, shuffled (PEFT's UniLoRA rule)"
    )


class UniLoraLayer(AdaptedLayer):
    factor_names = ()
    unilora_theta_d: torch.Tensor  # the trained vector, shared by every layer
    unilora_assignment: torch.Tensor  # every entry's index into it, frozen and shared
    inverse_sqrt_uses: torch.Tensor  # per index of θ: 1/√(entries assigned to it)
    offset: int  # where this layer's A entries start in the assignment; its B's follow

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {}

    @staticmethod
    def shared_tensors(dims: list[tuple[int, int]], hyper: Hyper) -> dict[str, SharedTensor]:
        entries = sum(hyper.rank * (d_in + d_out) for d_in, d_out in dims)
        return {
            "unilora_theta_d": SharedTensor((hyper.settings.vector_length,)),
            "unilora_assignment": SharedTensor((entries,), assignment_rule(hyper.settings.projection_seed)),
        }

    @staticmethod
    def init_shared_tensors(tensors: dict[str, torch.Tensor], hyper: Hyper) -> None:
        settings = hyper.settings
        bound = settings.init_bound
        nn.init.uniform_(tensors["unilora_theta_d"], -bound, bound)
        assignment = tensors["unilora_assignment"]
        assignment.copy_(balanced_assignment(assignment.numel(), settings.vector_length, settings.projection_seed))

    @staticmethod
    def link_layers(layers: list[AdaptedLayer], hyper: Hyper) -> None:
        """Give each layer, in model order, its offset into the assignment (A's entries, then B's) and the scales."""
        indices = cast(UniLoraLayer, layers[0]).unilora_assignment.detach().long()
        uses = torch.bincount(indices, minlength=hyper.settings.vector_length).float()
        inverse_sqrt_uses = torch.where(uses > 0, uses.rsqrt(), 0.0)
        offset = 0
        for layer in cast(list[UniLoraLayer], layers):
            # A buffer so that it follows the model's device and dtype; not saved: regenerated with the assignment.
            layer.register_buffer("inverse_sqrt_uses", inverse_sqrt_uses, persistent=False)
            layer.offset = offset
            offset += hyper.rank * (layer.d_in + layer.d_out)

    def indices(self, side: str) -> torch.Tensor:
        """This layer's indices into θ for A (r × d_in) or B (d_out × r)."""
        rank = self.hyper.rank
        start, shape = (
            (self.offset, (rank, self.d_in)) if side == "A" else (self.offset + rank * self.d_in, (self.d_out, rank))
        )
        return self.unilora_assignment[start : start + shape[0] * shape[1]].long().view(shape)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        theta, scales = self.unilora_theta_d, self.inverse_sqrt_uses
        index_A, index_B = self.indices("A"), self.indices("B")
        return theta[index_A] * scales[index_A], theta[index_B] * scales[index_B], 1.0


UNILORA = Method(
    "unilora",
    UniLoraLayer,
    summary="one trainable vector θ for the model; every A, B entry a fixed scaled θ entry",
    settings="unilora",
)
