"""LoRA: h = W x + (α/r) · B A x, with A (r × d_in) Kaiming-uniform and B (d_out × r) zeros."""

import math

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, Method, lora_scaling


class LoraLayer(AdaptedLayer):
    factor_names = ("lora_A", "lora_B")
    lora_A: torch.Tensor
    lora_B: torch.Tensor

    def __init__(self, base_layer: nn.Module, factors: dict[str, nn.Parameter], hyper: Hyper):
        super().__init__(base_layer, factors, hyper)
        self.scaling = lora_scaling(hyper)

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (hyper.rank, d_in), "lora_B": (d_out, hyper.rank)}

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        if name == "lora_A":
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        else:
            nn.init.zeros_(tensor)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.scaling


LORA = Method("lora", LoraLayer, summary="A and B per layer: ΔW = (α/r) B A")
