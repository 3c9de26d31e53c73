"""Runs a model's adapted layers, computing together the adapters of layers that read the same input.

This is the one place that knows how to fuse; methods only say what their ΔW = s · B A is
(`low_rank()`), whatever their A and B are (parameters, frozen tensors, or tensors computed from
others). adapters/low_rank_function.py holds the autograd nodes and says why they exist.

How layers are grouped: by watching them. When an adapted layer is called with the very tensor
(same object, same version) the previous adapted call received, the two read the same input (q, k
and v of an attention block; gate and up of a Llama MLP), and the later one joins the earlier one's
group. From then on the first member called ("leader") computes every member's adapter in one
node and leaves each sibling's result pending; a sibling called with that same tensor takes its
result, one called with another tensor leaves the group. Group changes take effect at the next
forward of the whole model, never during one: a gradient-checkpointed block recomputed in backward
must save the same tensors as its first forward did. A layer with dropout draws its own mask, so
its adapter input is its own and it never joins a group.

A concatenation or cast of factor Parameters (the A's of q, k and v; under autocast, every factor
in bfloat16) is built once per forward pass of the model, not once per layer: ShareA's shared A's
are concatenated once per step (FactorCasts).
"""

import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from sharelora_cli.adapters.low_rank_function import AddLowRank, FusedPart, GroupLayout, SharedInputProduct


class FusableLayer(Protocol):
    """What fusion needs of an adapted layer (adapters/base.py's AdaptedLayer, which imports this module)."""

    group: "Group"
    merged: bool
    dropout: nn.Module
    base_layer: nn.Module

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]: ...

    def fusable_base(self) -> tuple[torch.Tensor, torch.Tensor | None] | None: ...


@dataclass(eq=False)
class Group:
    """Adapted layers that read one input tensor, and the results the leader computed for the others."""

    members: list[FusableLayer]
    pending: dict[FusableLayer, "Pending"] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        # Pending results belong to one forward pass (and autograd graph); a copy of the model starts without.
        return {"members": self.members, "pending": {}}


class Pending(NamedTuple):
    """A sibling's result, computed by its group's leader, for the call that passes `x` again."""

    x: torch.Tensor
    key: tuple  # (x's version, grad mode, autocast dtype, generation) when it was computed
    output: torch.Tensor | None  # a fused layer's whole output, or
    delta: tuple | None  # (x as 2-D, h, B, B in the compute dtype, its transpose, s): see add_delta


class Fusion:
    """The grouping state of one model's adapted layers (module docstring)."""

    def __init__(self) -> None:
        self.generation = 0  # counts model forwards: pending results and cached copies never outlive theirs
        self.last_call: tuple[weakref.ref, tuple, FusableLayer] | None = None
        self.joins: list[tuple[FusableLayer, FusableLayer]] = []
        self.leaves: list[FusableLayer] = []
        self.casts = FactorCasts()

    def start_forward(self, *_: Any) -> None:
        """Forward pre-hook of the whole model: a new pass, with the group changes seen so far applied."""
        if torch.compiler.is_compiling():
            return
        self.generation += 1
        self.casts.generation = self.generation
        self.last_call = None
        for layer in self.leaves:
            if len(layer.group.members) > 1:
                layer.group.members.remove(layer)
                layer.group = Group([layer])
        for layer, sibling in self.joins:
            if len(layer.group.members) == 1 and layer.group is not sibling.group:
                sibling.group.members.append(layer)
                layer.group = sibling.group
        self.joins.clear()
        self.leaves.clear()

    def forward(self, layer: FusableLayer, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        autocast = autocast_dtype(x)
        key = (input_version(x), torch.is_grad_enabled(), autocast, self.generation)
        entry = layer.group.pending.pop(layer, None)
        if entry is not None and entry.key == key and entry.x is x and (entry.output is None or not (args or kwargs)):
            # (a fused output was computed without the arguments a plain linear does not take)
            if entry.output is not None:
                result = entry.output
            else:
                assert entry.delta is not None  # a pending result holds its output or its delta
                result = add_delta(layer, x, args, kwargs, *entry.delta)
        else:
            if entry is not None and entry.key[3] == self.generation and entry.x is not x:
                self.leaves.append(layer)
            self.note_sibling(layer, x, key)
            result = self.run(layer, x, key, autocast, args, kwargs)
        self.last_call = (weakref.ref(x), key, layer)
        return result

    def note_sibling(self, layer: FusableLayer, x: torch.Tensor, key: tuple) -> None:
        """Plan layer's joining the previous call's group when both read this same tensor."""
        if self.last_call is None:
            return
        ref, last_key, previous = self.last_call
        if (
            ref() is x
            and last_key == key
            and previous is not layer
            and layer.group is not previous.group
            and len(layer.group.members) == 1
            and groupable(layer)
            and groupable(previous)
        ):
            self.joins.append((layer, previous))

    def run(
        self, layer: FusableLayer, x: torch.Tensor, key: tuple, autocast: torch.dtype | None, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """Compute layer's output; as its group's leader, also leave every sibling's result pending."""
        alone = bool(args or kwargs)  # a base taking more arguments is not a plain linear, and has no siblings
        members = [layer] if alone else [layer] + [m for m in layer.group.members if m is not layer and not m.merged]
        dtype: torch.dtype | None = None
        As: list[torch.Tensor] = []
        block_of: dict[int, int] = {}  # id(A) -> its row block: identical A's are multiplied once
        fused: list[tuple[FusableLayer, torch.Tensor, FusedPart]] = []
        others: list[tuple[FusableLayer, int, torch.Tensor, float]] = []
        for member in members:
            lora_A, lora_B, scaling = member.low_rank()
            dtype = dtype or autocast or lora_A.dtype
            block = block_of.setdefault(id(lora_A), len(As))
            if block == len(As):
                As.append(lora_A)
            base = None if alone else member.fusable_base()
            if base is not None and base[0].dtype == dtype:
                fused.append(
                    (member, lora_B, FusedPart(block, scaling, *base, *self.casts.with_transpose(lora_B, dtype)))
                )
            else:  # its own forward makes (or casts) the base product
                others.append((member, block, lora_B, scaling))

        assert dtype is not None  # members holds at least the layer itself
        returned = tuple(dict.fromkeys(block for _, block, _, _ in others))
        layout = GroupLayout(
            tuple(A.shape[0] for A in As),
            self.casts.stacked(tuple(As), dtype),
            tuple(part for *_, part in fused),
            returned,
        )
        # Everything runs on (tokens, features) matrices; outputs get x's leading shape back at the end.
        x2 = x.reshape(-1, x.shape[-1])
        x_a2 = x2 if groupable(layer) else layer.dropout(x2)
        outputs = SharedInputProduct.apply(layout, x2, x_a2, *As, *(lora_B for _, lora_B, _ in fused))

        leading, pending, result = x.shape[:-1], layer.group.pending, None
        for (member, _, _), y in zip(fused, outputs):
            y = y.view(*leading, y.shape[-1])
            if member is layer:
                result = y
            else:
                pending[member] = Pending(x, key, y, None)
        for member, block, lora_B, scaling in others:
            delta = (
                x2,
                outputs[len(fused) + returned.index(block)],
                lora_B,
                *self.casts.with_transpose(lora_B, dtype),
                scaling,
            )
            if member is layer:
                result = add_delta(layer, x, args, kwargs, *delta)
            else:
                pending[member] = Pending(x, key, None, delta)
        assert result is not None  # the layer is one of the members, fused or not
        return result


def add_delta(
    layer: FusableLayer, x: torch.Tensor, args: tuple, kwargs: dict, x2, h, lora_B, lora_B_c, lora_B_t, scaling
):
    """layer's base output plus its adapter term, the base fed the 2-D view of x (a linear acts on the last dim)."""
    if args or kwargs:
        base_out = layer.base_layer(x, *args, **kwargs).reshape(-1, lora_B.shape[0])
    else:
        base_out = layer.base_layer(x2)
    out = AddLowRank.apply(base_out, h, lora_B, lora_B_c, lora_B_t, scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


def input_version(x: torch.Tensor) -> int:
    """x's version counter; -1 for a tensor made under inference_mode, which has none (evaluation only:
    nothing there writes into a layer input between the calls of its readers)."""
    return -1 if x.is_inference() else x._version


def groupable(layer: FusableLayer) -> bool:
    """A layer with dropout feeds its adapter its own masked input, which no sibling shares."""
    return isinstance(layer.dropout, nn.Identity)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class FactorCasts:
    """Concatenations, casts and transposes of Parameters, reused while they are valid.

    A copy (a concatenation or a cast) is valid for one forward pass of the model (one `generation`
    of the Fusion): parameters change only between passes, and an optimizer may change them without
    bumping their version counters (torch's fused AdamW does not), so versions cannot tell. Before the
    first pass (layers used on their own) nothing is copied twice. A transposed view of a Parameter
    stays valid as long as the Parameter keeps its storage.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple] = {}
        self.generation = 0

    def __getstate__(self) -> dict:
        return {"entries": {}, "generation": 0}  # keyed by this model's Parameters: a copy builds its own

    def stacked(self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensors concatenated along dim 0, in dtype, detached (a lone one already in dtype: itself)."""
        if len(tensors) == 1 and tensors[0].dtype == dtype:
            return tensors[0]
        if self.generation == 0 or not all(type(t) is nn.Parameter for t in tensors):
            return build(tensors, dtype)  # computed tensors are new at every call
        key = (tuple(map(id, tensors)), dtype)
        entry = self.entries.get(key)
        if entry is None or entry[0] != self.generation:
            entry = self.entries[key] = (
                self.generation,
                build(tensors, dtype),
                tensors,
            )  # holding them keeps ids unique
        return entry[1]

    def with_transpose(self, tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(tensor in dtype, its transpose as a view)."""
        copy = tensor.dtype != dtype
        if type(tensor) is not nn.Parameter or (copy and self.generation == 0):
            return transposed(build((tensor,), dtype) if copy else tensor)
        stamp = self.generation if copy else tensor.data_ptr()
        key = (id(tensor), dtype)
        entry = self.entries.get(key)
        if entry is None or entry[0] != stamp:
            entry = self.entries[key] = (stamp, transposed(build((tensor,), dtype) if copy else tensor), tensor)
        return entry[1]


def transposed(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return tensor, tensor.t()


def build(tensors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        stacked = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return stacked.to(dtype)


def find_shared_inputs(model: nn.Module, device: torch.device) -> None:
    """Let a causal LM's adapted layers find which of them read one input, by one tiny no-grad forward.

    Training calls this before its first step so that every step, the first included, runs the same
    grouped computation: a run resumed from a checkpoint then computes exactly what the uninterrupted
    run did (a grouped and a lone computation differ in float rounding).
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    model.train(was_training)
