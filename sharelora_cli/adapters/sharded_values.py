"""Adapter tensors that may be sharded over processes (FSDP2's DTensors, training/sharding.py) read or set whole.

Adapter files, checkpoints, checksums and ASLoRA's similarity are defined on whole tensors; these two
functions are the only place a sharded tensor is turned into one or back. Both are collective: every
process must call them, in the same order.
"""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered from every process; any other tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def placed_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor split over the processes as `like` is; itself when `like` is not sharded."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)
