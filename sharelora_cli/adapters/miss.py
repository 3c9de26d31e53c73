"""MiSS (FOSSIL/Bone shard sharing): ΔW replicates one trainable shard D (r × d_out).

h = W x + (Σ_j x[j·r:(j+1)·r]) D, with x zero-padded to a multiple of r.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Method


class MissLayer(AdaptedLayer):
    factor_names = ("miss_D",)

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {"miss_D": (rank, d_out)}

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor) -> None:
        nn.init.zeros_(tensor)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.hyper.rank
        pad = -self.d_in % rank
        if pad:
            x = F.pad(x, (0, pad))
        chunk_sum = x.reshape(*x.shape[:-1], x.shape[-1] // rank, rank).sum(dim=-2)
        return chunk_sum @ self.miss_D

    def delta_weight(self) -> torch.Tensor:
        copies = -(-self.d_in // self.hyper.rank)
        return self.miss_D.t().repeat(1, copies)[:, : self.d_in]


MISS = Method("miss", MissLayer, summary="one shard D per layer, replicated along the input")
