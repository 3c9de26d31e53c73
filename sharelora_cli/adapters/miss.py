"""MiSS (FOSSIL/Bone shard sharing): ΔW replicates one trainable shard D (r × d_out).

h = W x + (Σ_j x[j·r:(j+1)·r]) D, with x zero-padded to a multiple of r.

Summing x's r-wide chunks is x Sᵀ for the fixed 0/1 matrix S = [I_r I_r ...] cut to d_in columns,
so ΔW = Dᵀ S: a low-rank product whose A is S and whose only trainable factor is D. MiSS thereby
runs on the same fused kernel as LoRA, and S costs one small tensor per (d_in, r) for all layers.
"""

from functools import cache

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method


@cache
def chunk_sum_matrix(d_in: int, rank: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """S (rank × d_in): S[i, j] = 1 where j ≡ i (mod rank), so that x Sᵀ sums x's rank-wide chunks."""
    # A normal tensor even if first asked for under inference mode: training saves it for backward.
    with torch.inference_mode(False):
        copies = -(-d_in // rank)
        return torch.eye(rank, device=device, dtype=dtype).repeat(1, copies)[:, :d_in].contiguous()


class MissLayer(AdaptedLayer):
    factor_names = ("miss_D",)
    miss_D: torch.Tensor

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {"miss_D": (hyper.rank, d_out)}

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        nn.init.zeros_(tensor)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        shard = self.miss_D
        return chunk_sum_matrix(self.d_in, self.hyper.rank, shard.device, shard.dtype), shard.t(), 1.0


MISS = Method("miss", MissLayer, summary="one shard D per layer, replicated along the input")
