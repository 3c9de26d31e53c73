"""VB-LoRA (Li et al., 2024, arXiv 2405.15179): every layer's A and B are mixtures of one shared vector bank.

The bank holds num_vectors vectors of length L (vector_length) and is one trainable tensor for the
whole model. A layer's A (r × d_in) is cut into r·d_in/L sub-vectors and B (d_out × r) into
d_out·r/L; each sub-vector is the softmax-weighted sum of the top-k bank vectors under its own
trainable logits (num_vectors of them). ΔW = B A stays a low-rank product (no α/r scaling, as in
the paper and PEFT), so the fused kernel runs it and autograd carries its gradients back to the
logits and the bank.

Semantics and defaults are PEFT's VBLoRAConfig: A's sub-vectors run along d_in for each rank row
(logits (r, d_in/L, N)), B's along d_out for each rank column (logits (d_out/L, r, N)); the bank
starts U(−init_vector_bank_bound, +init_vector_bank_bound), the logits N(0, init_logits_std²).
L must divide every adapted d_in and d_out. Trainable: N·L for the bank plus, per layer,
N·r·(d_in + d_out)/L logits (PEFT's `save_only_topk_weights` storage trick is not implemented).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method, SharedTensor
from sharelora_cli.core.errors import UserError


def check_vector_length(dims: list[tuple[int, int]], length: int) -> None:
    """vector_length must divide every adapted layer's d_in and d_out; say which value would."""
    sizes = [size for pair in dims for size in pair]
    if any(size % length for size in sizes):
        fitting = math.gcd(length, *sizes)
        raise UserError(
            f"adapter.vblora.vector_length={length} does not divide every adapted layer's d_in and "
            f"d_out ({', '.join(map(str, sorted(set(sizes))))}); choose a divisor of all of them, "
            f"e.g. {fitting}"
        )


def mixture(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., N) logits -> (..., L): the softmax over the top-k logits weighting their bank vectors."""
    top, indices = logits.topk(topk, dim=-1)
    return torch.einsum("...k,...kl->...l", F.softmax(top, dim=-1), bank[indices])


class VBLoraLayer(AdaptedLayer):
    factor_names = ("vblora_logits_A", "vblora_logits_B")
    vblora_logits_A: torch.Tensor
    vblora_logits_B: torch.Tensor
    vblora_vector_bank: torch.Tensor  # shared by every layer

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        settings = hyper.settings
        check_vector_length([(d_in, d_out)], settings.vector_length)
        tiles_in, tiles_out = d_in // settings.vector_length, d_out // settings.vector_length
        return {
            "vblora_logits_A": (hyper.rank, tiles_in, settings.num_vectors),
            "vblora_logits_B": (tiles_out, hyper.rank, settings.num_vectors),
        }

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        nn.init.normal_(tensor, 0.0, hyper.settings.init_logits_std)

    @staticmethod
    def shared_tensors(dims: list[tuple[int, int]], hyper: Hyper) -> dict[str, SharedTensor]:
        check_vector_length(dims, hyper.settings.vector_length)
        return {"vblora_vector_bank": SharedTensor((hyper.settings.num_vectors, hyper.settings.vector_length))}

    @staticmethod
    def init_shared_tensors(tensors: dict[str, torch.Tensor], hyper: Hyper) -> None:
        bound = hyper.settings.init_vector_bank_bound
        nn.init.uniform_(tensors["vblora_vector_bank"], -bound, bound)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        bank, topk, rank = self.vblora_vector_bank, self.hyper.settings.topk, self.hyper.rank
        lora_A = mixture(self.vblora_logits_A, bank, topk).reshape(rank, self.d_in)
        # (d_out/L, r, L) -> (d_out/L, L, r) -> (d_out, r): each rank column of B is its L-long pieces stacked.
        lora_B = mixture(self.vblora_logits_B, bank, topk).transpose(1, 2).reshape(self.d_out, rank)
        return lora_A, lora_B, 1.0


VBLORA = Method(
    "vblora", VBLoraLayer, summary="A and B per layer mixed from one shared vector bank (top-k)", settings="vblora"
)
