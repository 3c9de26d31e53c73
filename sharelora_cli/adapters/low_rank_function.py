"""The adapters' forward and backward as hand-written autograd nodes, for any ΔW = s · B A.

Every method gives its ΔW as s · B A (adapters/base.py; MiSS with a fixed A, adapters/miss.py), and
modules that read one input tensor (q/k/v; gate/up) run as one node, `SharedInputProduct`:

- one GEMM H = x [A_1; A_2; ...]ᵀ gives every module's first product (identical A's, such as
  MiSS's chunk-sum matrix, are multiplied once);
- a module whose base is a plain frozen linear (nn.Linear / Conv1D, weight in the compute dtype)
  has its whole output made here, y = x Wᵀ + b + s · h Bᵀ, the adapter term added in place
  (addmm_) into the base product; in backward the node adds every such module's base and adapter
  input gradients into one buffer;
- any other base (4-bit, hooked, trainable) makes its own output, and `AddLowRank` adds s · h Bᵀ to
  it out of place (another module's output may be a view or saved for its own backward).

Why hand-written: at the adapters' sizes a training step is bound by the number of operator
launches and the Python around them, not by arithmetic (docs/benchmarks.md, "Dispatches"). Here
each product is one kernel: the scaling s rides on addmm's alpha (with beta=0 for a fresh result,
so the `like` argument of `scaled_mm` only gives the shape), nothing is cast that already has the
compute dtype, and only what backward needs is saved: the input x (in the compute dtype) only when
some A trains, H (r-wide) for the B gradients, never a copy of x per module.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor, factor: torch.Tensor) -> torch.dtype:
    """The dtype the adapter's products run in: autocast's when it is on, else the factors'."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else factor.dtype


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float, like: torch.Tensor) -> torch.Tensor:
    """s · (a @ b) as one kernel: addmm with beta=0 ignores `like` (even NaN in it); it only gives the result's shape."""
    return torch.addmm(like, a, b, beta=0, alpha=scaling)


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in dtype, without dispatching a no-op cast when it already is."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class FusedPart(NamedTuple):
    """A module whose output SharedInputProduct computes whole: base product plus adapter term."""

    block: int  # which distinct A (row block of stacked_A) the module uses
    scaling: float
    weight: torch.Tensor  # frozen, in nn.Linear's (d_out, d_in) layout and the compute dtype
    bias: torch.Tensor | None
    lora_B: torch.Tensor  # B in the compute dtype (detached; the tracked B is the node's input)
    lora_B_t: torch.Tensor  # its transpose, a view made once (adapters/fusion.py caches it)


class GroupLayout(NamedTuple):
    """What one SharedInputProduct call computes; the tensors autograd tracks are passed beside it."""

    ranks: tuple[int, ...]  # rows of each distinct A in stacked_A
    stacked_A: torch.Tensor  # the distinct A's, concatenated, in the compute dtype (detached)
    fused: tuple[FusedPart, ...]
    returned_blocks: tuple[int, ...]  # blocks whose h is returned, for modules that add to their own base output


class SharedInputProduct(torch.autograd.Function):
    """Outputs: y of every fused module, then h of every returned block (module docstring). All 2-D: (tokens, ·).

    Inputs: the layout, the base input x, the adapter input x_a (x itself unless dropout made
    another), the distinct A's (tracked, in layout order) and each fused module's B (tracked).
    """

    @staticmethod
    def forward(ctx, layout: GroupLayout, x: torch.Tensor, x_a: torch.Tensor, *factors: torch.Tensor):
        dtype = layout.stacked_A.dtype
        x_a_c = as_dtype(x_a, dtype)
        H = F.linear(x_a_c, layout.stacked_A)
        blocks = H.split_with_sizes(layout.ranks, dim=1) if len(layout.ranks) > 1 else (H,)
        x_c = x_a_c if x_a is x else as_dtype(x, dtype)
        outputs = []
        for part in layout.fused:
            y = F.linear(x_c, part.weight, part.bias)
            outputs.append(y.addmm_(blocks[part.block], part.lora_B_t, alpha=part.scaling))
        outputs.extend(blocks[b] for b in layout.returned_blocks)

        a_trains = any(ctx.needs_input_grad[3 : 3 + len(layout.ranks)])
        ctx.save_for_backward(x_a_c if a_trains else None, H if layout.fused else None)
        ctx.layout = layout
        ctx.dtypes = (x.dtype, x_a.dtype, [f.dtype for f in factors])
        ctx.same_input = x_a is x
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        layout = ctx.layout
        x_a_c, H = ctx.saved_tensors
        x_dtype, x_a_dtype, factor_dtypes = ctx.dtypes
        needs = ctx.needs_input_grad
        n_blocks = len(layout.ranks)
        blocks = (H.split_with_sizes(layout.ranks, dim=1) if n_blocks > 1 else (H,)) if H is not None else ()
        g: list[torch.Tensor | None] = [None] * n_blocks  # ∂loss/∂h, per block
        dx = None
        factor_grads: list[torch.Tensor | None] = [None] * (n_blocks + len(layout.fused))
        for i, part in enumerate(layout.fused):
            dy = grads[i]
            if needs[1]:
                dx = torch.mm(dy, part.weight) if dx is None else dx.addmm_(dy, part.weight)
            h = blocks[part.block]
            if g[part.block] is None:
                g[part.block] = scaled_mm(dy, part.lora_B, part.scaling, like=h)
            else:
                g[part.block].addmm_(dy, part.lora_B, alpha=part.scaling)
            if needs[3 + n_blocks + i]:
                grad_B = scaled_mm(dy.t(), h, part.scaling, like=part.lora_B)
                factor_grads[n_blocks + i] = as_dtype(grad_B, factor_dtypes[n_blocks + i])
        for k, block in enumerate(layout.returned_blocks):
            dh = grads[len(layout.fused) + k]
            g[block] = dh if g[block] is None else g[block].add_(dh)
        filled = [block for block in g if block is not None]
        assert len(filled) == n_blocks  # every distinct A feeds at least one module
        G = torch.cat(filled, dim=1) if n_blocks > 1 else filled[0]

        grad_x_a = None
        if ctx.same_input and needs[1]:
            dx = torch.mm(G, layout.stacked_A) if dx is None else dx.addmm_(G, layout.stacked_A)
        elif needs[2]:
            grad_x_a = as_dtype(torch.mm(G, layout.stacked_A), x_a_dtype)
        grad_x = None if dx is None else as_dtype(dx, x_dtype)
        if x_a_c is not None:
            grad_A = torch.mm(G.t(), x_a_c)
            for k, piece in enumerate(grad_A.split_with_sizes(layout.ranks) if n_blocks > 1 else (grad_A,)):
                if needs[3 + k]:
                    factor_grads[k] = as_dtype(piece, factor_dtypes[k])
        return None, grad_x, grad_x_a, *factor_grads


class AddLowRank(torch.autograd.Function):
    """base_out + s · h Bᵀ, out of place, in base_out's dtype: for a base whose output is not ours to change.

    Inputs (2-D): the base output, h (from SharedInputProduct), B (tracked), B in the compute dtype and
    its transpose, s.
    Under autocast a 4-bit base returns its input's dtype (float32) while h is bfloat16: the bf16
    product is then added with promotion, as PEFT does.
    """

    @staticmethod
    def forward(
        ctx,
        base_out: torch.Tensor,
        h: torch.Tensor,
        lora_B: torch.Tensor,
        lora_B_c: torch.Tensor,
        lora_B_t: torch.Tensor,
        scaling: float,
    ):
        if base_out.dtype == h.dtype:
            out = torch.addmm(base_out, h, lora_B_t, alpha=scaling)
        else:
            delta = torch.mm(h, lora_B_t)
            if torch.promote_types(base_out.dtype, delta.dtype) != base_out.dtype:
                delta = delta.to(base_out.dtype)
            out = torch.add(base_out, delta, alpha=scaling)
        ctx.save_for_backward(h, lora_B_c)
        ctx.scaling = scaling
        ctx.B_dtype = lora_B.dtype
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        h, lora_B_c = ctx.saved_tensors
        dy = as_dtype(d_out, h.dtype)
        grad_h = scaled_mm(dy, lora_B_c, ctx.scaling, like=h) if ctx.needs_input_grad[1] else None
        grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = as_dtype(scaled_mm(dy.t(), h, ctx.scaling, like=lora_B_c), ctx.B_dtype)
        return d_out, grad_h, grad_B, None, None, None
