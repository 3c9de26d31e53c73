"""The sharing plan: which distinct factor tensors each adapted module uses.

Per module type (a *group*): the list of adapted module paths and, for each factor, the index of
the distinct tensor each module uses. LoRA uses indices 0..L-1, a shared factor uses [0]*L,
ASLoRA's merged B groups use any partition. Every method saves and loads through it.
"""

from dataclasses import dataclass, field

from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.recipe import AdapterConfig


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

    def __init__(self, model: nn.Module, config: AdapterConfig, groups: dict[str, Group]):
        self.model = model
        self.config = config
        self.groups = groups

    def parameters(self) -> list[nn.Parameter]:
        """Every distinct trainable tensor, once, in a stable order."""
        return [p for group in self.groups.values() for tensors in group.tensors.values() for p in tensors]

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """Stable names for the distinct tensors: '{group}.{factor}.{k}'."""
        return {
            f"{group.name}.{factor}.{k}": tensor
            for group in self.groups.values()
            for factor, tensors in group.tensors.items()
            for k, tensor in enumerate(tensors)
        }

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def layers(self) -> list[AdaptedLayer]:
        return [self.model.get_submodule(path) for group in self.groups.values() for path in group.modules]

    def plan(self) -> dict:
        return {name: group.plan() for name, group in self.groups.items()}

    def bind(self, group: Group, factor: str, tensors: list[nn.Parameter], index: list[int]) -> None:
        """Point every module of a group at its tensor for one factor (used by merges of shared factors)."""
        group.tensors[factor], group.index[factor] = tensors, index
        for path, k in zip(group.modules, index):
            setattr(self.model.get_submodule(path), factor, tensors[k])
