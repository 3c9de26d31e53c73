"""Learning-rate schedules: linear warm-up, then cosine, linear or constant, with transformers' formulas.

Written out rather than taken from `transformers.get_scheduler`: importing that imports transformers'
trainer utilities, and through them peft and bitsandbytes, in every run (bitsandbytes is for 4-bit only).
"""

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The multiple of the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(kind: str, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    return LambdaLR(optimizer, partial(lr_factor, kind=kind, warmup=warmup, total=total))
