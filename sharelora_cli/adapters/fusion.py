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
from typing import Any

import torch
from torch import nn

from sharelora_cli.adapters.low_rank_function import (
    AddLowRank,
    FusedPart,
    GroupLayout,
    SharedInputProduct,
    compute_dtype,
)


@dataclass(eq=False)
class Group:
    """Adapted layers that read one input tensor, and the results the leader computed for the others."""

    members: list[nn.Module]
    pending: dict[nn.Module, "Pending"] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        # Pending results belong to one forward pass (and autograd graph); a copy of the model starts without.
        return {"members": self.members, "pending": {}}


@dataclass(eq=False)
class Pending:
    """A sibling's result, computed by its group's leader, for the call that passes `x` again."""

    x: torch.Tensor
    key: tuple
    output: torch.Tensor | None = None  # a fused layer's whole output
    delta: tuple | None = None  # else (x as 2-D, h, B, B in the compute dtype, its transpose, s): see add_delta

    def matches(self, x: torch.Tensor, key: tuple, has_arguments: bool) -> bool:
        # A fused output was computed without the arguments a plain linear does not take.
        return self.x is x and self.key == key and not (self.output is not None and has_arguments)


@dataclass(frozen=True, eq=False)
class Member:
    """One layer's part in a group computation: its low_rank() and, when fused here, its base's weight and bias."""

    layer: nn.Module
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    base: tuple[torch.Tensor, torch.Tensor | None] | None

    @classmethod
    def of(cls, layer: nn.Module, dtype_of, may_fuse: bool) -> "Member":
        lora_A, lora_B, scaling = layer.low_rank()
        base = layer.fusable_base() if may_fuse else None
        if base is not None and base[0].dtype != dtype_of(lora_A):
            base = None  # a weight in another dtype: its own forward casts it
        return cls(layer, lora_A, lora_B, scaling, base)


class Fusion:
    """The grouping state of one model's adapted layers (module docstring)."""

    def __init__(self) -> None:
        self.generation = 0  # counts model forwards: pending results never outlive theirs
        self.last_call: tuple[weakref.ref, tuple, nn.Module] | None = None
        self.joins: list[tuple[nn.Module, nn.Module]] = []
        self.leaves: list[nn.Module] = []
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

    def forward(self, layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        key = (x._version, torch.is_grad_enabled(), autocast_dtype(x), self.generation)
        entry = layer.group.pending.pop(layer, None)
        if entry is not None and entry.key[-1] == self.generation and entry.matches(x, key, bool(args or kwargs)):
            result = entry.output if entry.output is not None else add_delta(layer, x, args, kwargs, *entry.delta)
        else:
            if entry is not None and entry.key[-1] == self.generation and entry.x is not x:
                self.leaves.append(layer)
            self.note_sibling(layer, x, key)
            result = self.run(layer, x, key, args, kwargs)
        self.last_call = (weakref.ref(x), key, layer)
        return result

    def note_sibling(self, layer: nn.Module, x: torch.Tensor, key: tuple) -> None:
        """Plan layer's joining the previous call's group when both read this same tensor."""
        if self.last_call is None:
            return
        ref, last_key, previous = self.last_call
        if (ref() is x and last_key == key and previous is not layer and layer.group is not previous.group
                and len(layer.group.members) == 1 and groupable(layer) and groupable(previous)):
            self.joins.append((layer, previous))

    def run(self, layer: nn.Module, x: torch.Tensor, key: tuple, args: tuple, kwargs: dict) -> torch.Tensor:
        """Compute layer's output; as its group's leader, also leave every sibling's result pending."""
        has_arguments = bool(args or kwargs)
        dtype_of = lambda factor: compute_dtype(x, factor)  # noqa: E731
        siblings = [] if has_arguments else [m for m in layer.group.members if m is not layer and not m.merged]
        members = [Member.of(layer, dtype_of, not has_arguments)] + [Member.of(m, dtype_of, True) for m in siblings]
        dtype = dtype_of(members[0].lora_A)
        fused = [m for m in members if m.base is not None]
        others = [m for m in members if m.base is None]

        block: dict[int, int] = {}
        As = []
        for m in members:
            if id(m.lora_A) not in block:
                block[id(m.lora_A)] = len(As)
                As.append(m.lora_A)
        parts = tuple(FusedPart(block[id(m.lora_A)], m.scaling, *m.base, *self.casts.with_transpose(m.lora_B, dtype))
                      for m in fused)
        returned = tuple(dict.fromkeys(block[id(m.lora_A)] for m in others))
        layout = GroupLayout(tuple(A.shape[0] for A in As), self.casts.stacked(tuple(As), dtype), parts, returned)
        # Everything runs on (tokens, features) matrices; outputs get x's leading shape back at the end.
        x2 = x.reshape(-1, x.shape[-1])
        outputs = SharedInputProduct.apply(layout, x2, layer.dropout(x2), *As, *(m.lora_B for m in fused))

        leading = x.shape[:-1]
        results = {m.layer: Pending(x, key, output=y.view(*leading, y.shape[-1])) for m, y in zip(fused, outputs)}
        for m in others:
            h = outputs[len(fused) + returned.index(block[id(m.lora_A)])]
            results[m.layer] = Pending(x, key, delta=(x2, h, m.lora_B, *self.casts.with_transpose(m.lora_B, dtype), m.scaling))
        own = results.pop(layer)
        layer.group.pending.update(results)
        return own.output if own.output is not None else add_delta(layer, x, args, kwargs, *own.delta)


def add_delta(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, x2, h, lora_B, lora_B_c, lora_B_t, scaling):
    """layer's base output plus its adapter term, the base fed the 2-D view of x (a linear acts on the last dim)."""
    if args or kwargs:
        base_out = layer.base_layer(x, *args, **kwargs).reshape(-1, lora_B.shape[0])
    else:
        base_out = layer.base_layer(x2)
    out = AddLowRank.apply(base_out, h, lora_B, lora_B_c, lora_B_t, scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


def groupable(layer: nn.Module) -> bool:
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
        return self.cached(("stack", dtype), tensors, True, lambda: build(tensors, dtype))

    def with_transpose(self, tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(tensor in dtype, its transpose as a view)."""
        cast = tensor.dtype != dtype

        def make():
            copy = build((tensor,), dtype) if cast else tensor
            with torch.no_grad():
                return copy, copy.t()

        return self.cached(("transpose", dtype), (tensor,), cast, make)

    def cached(self, kind: tuple, tensors: tuple[torch.Tensor, ...], copies: bool, make):
        """make()'s result for these tensors, rebuilt when one changes storage or, for copies, at each pass."""
        if not all(isinstance(t, nn.Parameter) for t in tensors) or (copies and self.generation == 0):
            return make()  # computed tensors are new at every call
        key = (kind, tuple(id(t) for t in tensors))
        stamp = (self.generation if copies else None,) + tuple((t.data_ptr(), t.shape, t.stride()) for t in tensors)
        entry = self.entries.get(key)
        if entry is None or entry[0] != stamp:
            entry = self.entries[key] = (stamp, make(), tensors)  # holding the Parameters keeps their ids unique
        return entry[1]


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
