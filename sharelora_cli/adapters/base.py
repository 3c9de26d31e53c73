"""The interface every adapter method implements.

An adapted layer wraps a frozen base layer (nn.Linear, GPT-2 Conv1D or bitsandbytes
Linear4bit) and adds a trainable delta: h = base(x) + s · B A x, every method giving its ΔW as
a low-rank product (run by adapters/fusion.py, which computes together the adapters of layers
that read one input; ΔW is never materialised). Its tensors are *factors* (lora_A, lora_B,
miss_D, ...). A factor may be one nn.Parameter
shared by every layer of a module type: the same object is registered in each layer, so autograd
sums its gradient over all of them and nothing is ever copied. A method may also declare *shared
tensors* that every adapted layer of the model uses, whatever its type (VeRA's random pair, VB-LoRA's
vector bank), and *frozen* factors or shared tensors, which are registered with requires_grad=False:
they are never counted as trainable and never reach the optimizer.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from sharelora_cli.adapters.fusion import Fusion, Group
from sharelora_cli.adapters.low_rank_function import compute_dtype


def is_conv1d(layer: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (d_in, d_out), the transpose of nn.Linear."""
    return isinstance(layer, Conv1D)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like layer."""
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise TypeError(f"{type(layer).__name__} is not a linear layer")


def plain_frozen_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight in nn.Linear's (d_out, d_in) layout, bias) when the layer is a plain frozen product.

    Only then may an adapter compute the base product itself, fused with its delta. None for
    layers with their own forward (4-bit, subclasses), trainable weights, or hooks it would skip.
    """
    if type(layer) not in (nn.Linear, Conv1D) or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    assert isinstance(layer, (nn.Linear, Conv1D))  # the exact type was checked just above
    weight, bias = layer.weight, layer.bias  # a plain linear's only parameters
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    return (weight.t() if is_conv1d(layer) else weight), bias


def is_adaptable(layer: nn.Module) -> bool:
    """nn.Linear and its subclasses (bitsandbytes Linear4bit/Linear8bitLt) and Conv1D."""
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters every layer of an adapter shares."""

    rank: int
    alpha: float
    dropout: float
    rslora: bool
    # The method's own recipe section (adapter.vera, adapter.vblora, ...); None for methods without one.
    settings: Any = None


@dataclass(frozen=True)
class SharedTensor:
    """A tensor every adapted layer of the model uses, one object for all of them."""

    shape: tuple[int, ...]
    # None: trained, and saved with the adapter. Otherwise frozen and regenerated from the adapter config by
    # this rule (a sentence naming the seed); the saved adapter records the rule and a checksum of the tensor.
    regenerated_by: str | None = None


class AdaptedLayer(nn.Module):
    """A frozen base layer plus a trainable delta. Subclasses define the factors and ΔW's A, B and s."""

    #: the factors of one layer, as attribute names; set by each method.
    factor_names: tuple[str, ...] = ()
    #: what ΔW is, which says how the layer exports as plain LoRA: "low_rank" (low_rank() gives it exactly),
    #: "full_rank" (only delta_weight(); a LoRA export truncates its SVD) or "input_dependent" (no single ΔW:
    #: neither merge nor a LoRA export can represent it).
    update_form: ClassVar[Literal["low_rank", "full_rank", "input_dependent"]] = "low_rank"

    def __init__(self, base_layer: nn.Module, factors: dict[str, nn.Parameter], hyper: Hyper):
        """factors: the layer's factors and the model's shared tensors, by attribute name."""
        super().__init__()
        self.base_layer: nn.Module = base_layer
        self.d_in, self.d_out = layer_shape(base_layer)
        self.hyper = hyper
        self.merged = False
        for name, tensor in factors.items():
            setattr(self, name, tensor)
        self.dropout: nn.Module = nn.Dropout(hyper.dropout) if hyper.dropout > 0 else nn.Identity()
        # Plain attributes, not submodules: inject_adapter gives every layer of a model one Fusion.
        self.fusion = Fusion()
        self.group = Group([self])

    @staticmethod
    def factor_shapes(d_in: int, d_out: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @staticmethod
    def init_factor(name: str, tensor: torch.Tensor, hyper: Hyper) -> None:
        raise NotImplementedError

    @staticmethod
    def layer_index(factor: str, layers: int, hyper: Hyper) -> list[int] | None:
        """Which distinct tensor of `factor` each of a module type's `layers` uses, for a method with its own
        sharing rule (Lily's A per stride of adjacent layers); None: the Method's (one per layer, or one shared)."""
        return None

    @staticmethod
    def frozen_factors(hyper: Hyper) -> frozenset[str]:
        """Factors that do not train (they still take part in ΔW and are saved)."""
        return frozenset()

    @staticmethod
    def shared_tensors(dims: list[tuple[int, int]], hyper: Hyper) -> dict[str, SharedTensor]:
        """The tensors every adapted layer uses, given every adapted layer's (d_in, d_out)."""
        return {}

    @staticmethod
    def init_shared_tensors(tensors: dict[str, torch.Tensor], hyper: Hyper) -> None:
        """Fill the shared tensors (float32, on the CPU) in place."""

    @staticmethod
    def link_layers(layers: list["AdaptedLayer"], hyper: Hyper) -> None:
        """Called once after injection with every adapted layer in model order, for a method whose layers hold
        frozen state computed from all of them (UniLoRA's global index assignment)."""

    def place(self, index: int, count: int) -> None:
        """Called once by inject_adapter: this layer is the index-th of the model's `count` adapted layers (model order).

        For methods whose frozen factors come from the base weight or the layer's position (TinyLoRA's SVD and
        per-layer seeds); a loaded adapter's saved tensors then replace what this computed.
        """

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ΔW = s · B A: A is (r × d_in), B is (d_out × r); a method may fix either."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW as a (d_out, d_in) tensor in the factors' dtype, so that h = (W + ΔW) x."""
        lora_A, lora_B, scaling = self.low_rank()
        return (lora_B @ lora_A) * scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if torch.compiler.is_compiling():
            return self.plain_forward(x, *args, **kwargs)
        return self.fusion.forward(self, x, args, kwargs)

    def plain_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base(x) + s · B A x as plain operators: what torch.compile traces, and the fused path's reference."""
        lora_A, lora_B, scaling = self.low_rank()
        result = self.base_layer(x, *args, **kwargs)
        dtype = compute_dtype(x, lora_A)
        delta = F.linear(F.linear(self.dropout(x).to(dtype), lora_A.to(dtype)), lora_B.to(dtype)) * scaling
        return result + delta.to(result.dtype)

    def fusable_base(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) when the adapter may compute the base product itself (plain_frozen_weight)."""
        return plain_frozen_weight(self.base_layer)

    def merge(self) -> None:
        """Fold ΔW into a full-precision base weight in place (reversible with unmerge); idempotent."""
        if not self.merged:
            self._add_to_base_weight(self.delta_weight())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base_weight(-self.delta_weight())
            self.merged = False

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError("in-place merge needs a full-precision base; use `sharelora merge` for 4-bit bases")
        delta = delta.t() if is_conv1d(self.base_layer) else delta
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.hyper.rank}"


def lora_scaling(hyper: Hyper) -> float:
    return hyper.alpha / (hyper.rank**0.5 if hyper.rslora else hyper.rank)


class TrainerHook(Protocol):
    """What the training loop calls after every optimizer step of a method whose sharing plan changes."""

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Act after optimizer step `step` (1-based); True when the plan and the optimizer's parameters changed."""
        ...


@dataclass(frozen=True)
class Method:
    """An adapter method: its layer type and which factors one module type shares across layers."""

    name: str
    layer_cls: type[AdaptedLayer]
    shared: frozenset[str] = frozenset()
    summary: str = ""
    # (adapter, max_steps) -> hook the loop calls after each optimizer step; None: the plan is fixed.
    make_trainer_hook: Callable[[Any, int], TrainerHook] | None = None
    # Parameters may stop being used mid-run, so DDP must look for unused ones (find_unused_parameters).
    drops_parameters: bool = False
    # The AdapterConfig field holding the method's own settings (Hyper.settings), if it has one.
    settings: str | None = None
