"""The sharing plan: which distinct factor tensors each adapted module uses.

Per module type (a *group*): the list of adapted module paths and, for each factor, the index of
the distinct tensor each module uses. LoRA uses indices 0..L-1, a shared factor uses [0]*L,
ASLoRA's merged B groups use any partition. Every method saves and loads through it.

Beside the groups, an adapter may hold *shared tensors* that every adapted module uses (VeRA's
random pair, VB-LoRA's vector bank). Their names have no dot, so they never collide with a group
tensor's '{group}.{factor}.{k}'. Frozen ones are regenerated from the adapter config, not saved.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.adapters.sharded_values import full_value
from sharelora_cli.config.recipe import AdapterConfig


@dataclass
class Group:
    """The adapted modules of one module type, and the distinct factor tensors they use."""

    name: str
    modules: list[str]
    d_in: int
    d_out: int
    index: dict[str, list[int]]
    tensors: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    # Changes made to the plan while training (ASLoRA's B merges), oldest first; saved with it.
    merges: list[dict] = field(default_factory=list)

    def plan(self) -> dict:
        plan = {"modules": self.modules, "d_in": self.d_in, "d_out": self.d_out, "index": self.index}
        return {**plan, "merges": self.merges} if self.merges else plan


class Adapter:
    """The adapters injected into one model."""

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        groups: dict[str, Group],
        shared: dict[str, nn.Parameter] | None = None,
        regenerated: dict[str, str] | None = None,
    ):
        """shared: the tensors every adapted module uses, by name; regenerated: rule per frozen shared tensor."""
        self.model = model
        self.config = config
        self.groups = groups
        self.shared = shared or {}
        self.regenerated = regenerated or {}

    def parameters(self) -> list[nn.Parameter]:
        """Every distinct trainable tensor, once, in a stable order (frozen factors and shared tensors left out)."""
        return [p for p in self._distinct_tensors() if p.requires_grad]

    def _distinct_tensors(self) -> list[nn.Parameter]:
        grouped = [p for group in self.groups.values() for tensors in group.tensors.values() for p in tensors]
        return grouped + list(self.shared.values())

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """What an adapter file holds, by stable name: '{group}.{factor}.{k}', and shared tensors by their own name.

        Frozen factors are included (nothing else could rebuild them); regenerated shared tensors are not.
        """
        grouped = {
            f"{group.name}.{factor}.{k}": tensor
            for group in self.groups.values()
            for factor, tensors in group.tensors.items()
            for k, tensor in enumerate(tensors)
        }
        return grouped | {name: t for name, t in self.shared.items() if name not in self.regenerated}

    def regenerated_record(self) -> dict[str, dict]:
        """What the adapter file records of its regenerated shared tensors (see regenerated_record)."""
        return regenerated_record(self.shared, self.regenerated)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def layers(self) -> list[AdaptedLayer]:
        return [
            cast(AdaptedLayer, self.model.get_submodule(path))
            for group in self.groups.values()
            for path in group.modules
        ]

    def plan(self) -> dict:
        return {name: group.plan() for name, group in self.groups.items()}

    def bind(self, group: Group, factor: str, tensors: list[nn.Parameter], index: list[int]) -> None:
        """Point every module of a group at its tensor for one factor (used by merges of shared factors)."""
        group.tensors[factor], group.index[factor] = tensors, index
        for path, k in zip(group.modules, index):
            setattr(self.model.get_submodule(path), factor, tensors[k])

    def bind_shared(self, name: str, tensor: nn.Parameter) -> None:
        """Point every adapted module at one shared tensor."""
        self.shared[name] = tensor
        for layer in self.layers():
            setattr(layer, name, tensor)


def regenerated_record(tensors: Mapping[str, torch.Tensor], rules: dict[str, str]) -> dict[str, dict]:
    """Per regenerated tensor: its rule, shape and the SHA-256 of its float32 bytes, so a load can prove it drew the same."""
    return {
        name: {"rule": rule, "shape": list(tensors[name].shape), "sha256": tensor_digest(tensors[name])}
        for name, rule in rules.items()
    }


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(
        full_value(tensor).detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    ).hexdigest()
