"""Tolerances derived from floating-point arithmetic, never from what one machine printed.

Higham (Accuracy and Stability of Numerical Algorithms, §3.1): a sum of n terms evaluated in any order
in precision u is off by at most γ_{n-1}·Σ|terms|, with γ_k = k·u / (1 − k·u). Two evaluations of the same
sum in different orders (another kernel, another blocking, another thread count, a shared tensor's
gradient accumulated by autograd rather than added by hand) therefore differ by at most 2·γ_n·Σ|terms|.
A bound built here depends only on the dtype, the length of the sum and the size of its terms, so it holds
on CPUs with and without AVX512-BF16/AMX and with any number of threads.
"""

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n: the relative error bound of n rounding steps in a row."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, "the sum is too long for this precision to bound"
    return nu / (1 - nu)


def reordering_bound(n_terms: int, magnitude_sum: float | torch.Tensor, dtype: torch.dtype = torch.float32):
    """How far two evaluations of a sum of n_terms terms whose magnitudes add up to magnitude_sum can differ."""
    return 2 * gamma(n_terms, dtype) * magnitude_sum


def summed_gradients_bound(per_layer_grads: list[torch.Tensor], uses_per_layer: int, tokens: int) -> float:
    """Bound on |the shared tensor's gradient − Σ of per-layer copies' gradients|.

    Each entry of either is a sum over the batch's tokens of every use's contribution (tokens × uses per
    layer × layers terms), only added up in another order. The terms' magnitudes are taken to add up to
    at most the largest entry of Σ over layers of |per-layer gradient| (the whole tensor's largest, so that
    an entry where two uses of one layer cancel does not shrink the bound below the terms that were added);
    γ_n grows linearly in n where rounding errors in practice grow like √n, which covers cancellation
    between tokens.
    """
    scale = float(torch.stack([grad.abs() for grad in per_layer_grads]).sum(0).max())
    return float(reordering_bound(tokens * uses_per_layer * len(per_layer_grads), scale, per_layer_grads[0].dtype))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """|actual − expected| ≤ bound in every entry (bound broadcasts); names the worst entry otherwise."""
    difference = (actual.detach() - expected.detach()).abs()
    excess = (difference - bound).flatten()
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"entry {worst}: difference {difference.flatten()[worst]:.3g} exceeds its bound "
        f"{torch.broadcast_to(bound, difference.shape).flatten()[worst]:.3g}"
    )
