"""train.liger_kernel: Liger's Triton kernels (fused RMSNorm, RoPE, SwiGLU, linear cross-entropy), CUDA only.

The fused linear cross-entropy computes the loss from the last hidden states and the output head's
weight in chunks, so the (batch × sequence × vocabulary) logits tensor and its gradient, a large
part of a Llama-3 step's memory with its 128k vocabulary, never exist. It reads the head's weight
directly, so the head itself cannot carry an adapter.
"""

import torch
from transformers import PreTrainedModel

from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.core.errors import UserError


def require_liger_kernel(device: torch.device) -> None:
    """Refuse train.liger_kernel, before anything is loaded, where it cannot run."""
    if device.type != "cuda":
        raise UserError(
            "train.liger_kernel needs a CUDA GPU (Liger's kernels are Triton); set train.liger_kernel=false"
        )
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        raise UserError(
            "train.liger_kernel needs the liger-kernel package: pip install 'sharelora[gpu]', "
            "or set train.liger_kernel=false"
        ) from None


def apply_liger_kernel(model: PreTrainedModel) -> None:
    """Swap the model's norms, rotary embedding, MLP activation and training loss for Liger's kernels."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    if isinstance(model.get_output_embeddings(), AdaptedLayer):
        raise UserError(
            "train.liger_kernel's fused cross-entropy reads the output head's weight, which has an adapter "
            "here: leave lm_head out of adapter.targets, or set train.liger_kernel=false"
        )
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
    )
