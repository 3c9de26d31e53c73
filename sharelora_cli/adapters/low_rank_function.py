"""Every adapter's forward and backward as one autograd node: y = [x Wᵀ + b] + s · (x_a Aᵀ) Bᵀ.

Each method gives its ΔW as s · B A (MiSS with a fixed A; adapters/miss.py).

Why not let autograd differentiate F.linear(F.linear(x, A), B): its backward multiplies by B
(d_out × r) and forms B's gradient as dyᵀ h, layouts for which oneDNN/MKL's thin products run
2–4× slower on CPU than the transposed forms used here (docs/benchmarks.md, "Profile"). Fusing
the frozen base product into the same node also lets the adapter's terms accumulate in place
(addmm_) into the output and the input gradient instead of allocating and adding new tensors.

The base part is optional: a frozen weight (and bias) in nn.Linear layout, in the compute dtype,
is fused; any other base (4-bit, hooked, trainable) passes None and adds this node's output, the
delta alone, to its own.
"""

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor, factor: torch.Tensor) -> torch.dtype:
    """The dtype the adapter's products run in: autocast's when it is on, else the factors'."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else factor.dtype


class LowRankFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_a, lora_A, lora_B, scaling, x, weight, bias):
        dtype = compute_dtype(x_a, lora_A)
        leading = x_a.shape[:-1]
        x_a2 = x_a.reshape(-1, x_a.shape[-1]).to(dtype)
        A, B = lora_A.to(dtype), lora_B.to(dtype)
        h = x_a2 @ A.t()
        if weight is None:
            y = (h * scaling) @ B.t()
        else:
            y = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
            y.addmm_(h, B.t(), alpha=scaling)
        ctx.save_for_backward(x_a2, A, B, h, weight)
        ctx.scaling = scaling
        ctx.fused_input = weight is not None and x is x_a  # one input: its two gradients share a tensor
        ctx.dtypes = (x_a.dtype, lora_A.dtype, lora_B.dtype, None if x is None else x.dtype)
        return y.view(*leading, -1)

    @staticmethod
    def backward(ctx, dy):
        x_a2, A, B, h, weight = ctx.saved_tensors
        x_a_dtype, a_dtype, b_dtype, x_dtype = ctx.dtypes
        needs = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        # B's transpose made contiguous (r × d_out, tiny): dy·B then runs in the fast layout.
        g = (dy2 @ B.t().contiguous().t()).mul_(ctx.scaling)
        grad_A = (g.t() @ x_a2).to(a_dtype) if needs[1] else None
        grad_B = (h.t() @ dy2).mul_(ctx.scaling).t().to(b_dtype) if needs[2] else None
        grad_x = grad_x_a = None
        if weight is not None and needs[4]:
            grad_x = dy2 @ weight
            if ctx.fused_input:
                grad_x.addmm_(g, A)
            grad_x = grad_x.view(*dy.shape[:-1], -1).to(x_dtype)
        if needs[0] and not ctx.fused_input:
            grad_x_a = (g @ A).view(*dy.shape[:-1], -1).to(x_a_dtype)
        return grad_x_a, grad_A, grad_B, None, grad_x, None, None
