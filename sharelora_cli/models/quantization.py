"""4-bit bases through bitsandbytes: the import, the loading options, and one weight layout on every CPU.

bitsandbytes is imported only here and only when a 4-bit base or the 8-bit optimizer is asked for.

Why `keep_standard_layout`: on CPUs with AVX512-BF16, bitsandbytes (0.50) rewrites a Linear4bit's
weight for a bf16 inference kernel at the layer's first eval-mode, no-grad forward (any validation
or evaluation pass), for good. From then on no gradient flows back through the layer (that kernel
has no autograd formula; torch only warns), its outputs are bf16 products (5e-3 from the float32
ones on a 64→32 layer), and dequantising the rewritten weight gives other weights (its absmax is
rounded to bf16, so even bitsandbytes' own inverse is 2e-4 off). Training would silently change
after the first validation, and scores and merges would depend on the CPU. sharelora therefore
keeps every Linear4bit in the standard layout, where each forward dequantises to the compute
dtype: the same numbers on every CPU, at the speed of the path CPUs without AVX512-BF16 take.
"""

import logging
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sharelora_cli.config.recipe import QuantizationConfig


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module, imported without its import-time log lines.

    On AVX512-BF16 CPUs it logs at import that the optional `kernels` package is missing: nothing a
    user can act on, and a second stderr line before any one-line error.
    """
    import_logger = logging.getLogger("bitsandbytes")
    level = import_logger.level
    import_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    finally:
        import_logger.setLevel(level)
    return bnb


def bnb_config(quant: QuantizationConfig, sharded: bool = False):
    """transformers' quantization_config for a QLoRA-style 4-bit base (imports bitsandbytes quietly first).

    sharded (FSDP2): the packed 4-bit bytes are stored as the compute dtype (bnb_4bit_quant_storage), the dtype
    of every other weight, so FSDP2 shards them like the rest of their layer; the default uint8 storage would be
    a second dtype in the layer's group (Answer.AI's fsdp_qlora: quant_storage must equal FSDP's param dtype).
    The bytes are the same either way: only the tensor that holds them changes type.
    """
    bitsandbytes()
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if sharded else torch.uint8,
    )


def linear4bit_modules(model: nn.Module) -> list[Any]:
    linear4bit = bitsandbytes().nn.Linear4bit
    return [module for module in model.modules() if isinstance(module, linear4bit)]


def keep_standard_layout(model: nn.Module) -> None:
    """Keep every Linear4bit off bitsandbytes' CPU repacking (module docstring); refuse one already repacked."""
    for module in linear4bit_modules(model):
        module.support_avx512bf16_for_cpu = False
        check_standard_layout(module)


def check_standard_layout(module: Any) -> None:  # a bitsandbytes Linear4bit (untyped)
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "a Linear4bit weight was repacked for bitsandbytes' CPU bf16 kernel (an eval-mode forward ran before "
            "sharelora took the model); its dequantised weights are no longer the base's: load the model again"
        )


def dequantized_weight(module: Any) -> torch.Tensor:
    """A Linear4bit's weight as the dense (d_out, d_in) tensor its forward multiplies by."""
    check_standard_layout(module)
    weight = module.weight
    return bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)


def prepare_for_kbit_training(model: nn.Module) -> None:
    """QLoRA's preparation: the few non-quantised weights (norms, embeddings, head) go to float32."""
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
            param.data = param.data.float()
    keep_standard_layout(model)


def quantize_on_load(model: nn.Module, quant: QuantizationConfig) -> Any:
    """Turn a meta-device model into the skeleton from_pretrained builds for a 4-bit load; returns its quantizer.

    The same transformers code decides which linears become Linear4bit (not the output head, not the
    modules a model keeps in float32) and with which blocksize, double quantisation and storage type,
    so a tensor quantised through `as_loaded_4bit` is the one training's from_pretrained produced.
    """
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config(quant), pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "cpu"}, dtype=getattr(torch, quant.compute_dtype))
    return quantizer


def as_loaded_4bit(
    model: nn.Module, quantizer: Any, name: str, tensor: torch.Tensor, quant: QuantizationConfig, device: str
) -> torch.Tensor:
    """A checkpoint tensor as a 4-bit load leaves it: Linear4bit weights quantised and dequantised, the rest cast.

    name: the parameter's name in `model` (prepared by quantize_on_load). Loading casts every tensor to the
    compute dtype first, and quantises on the device it loads to; the result is on the CPU, in the checkpoint's
    layout (a Conv1D weight, transposed for quantisation, is transposed back).
    """
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize

    value = (
        tensor.to(device=device, dtype=getattr(torch, quant.compute_dtype)) if tensor.is_floating_point() else tensor
    )
    if not quantizer.param_needs_quantization(model, name):
        return value.to("cpu")
    packed: Any = Bnb4bitQuantize(quantizer).convert({name: [value]}, model=model)[name]  # a bitsandbytes Params4bit
    dense = bitsandbytes().functional.dequantize_4bit(packed.data, packed.quant_state)
    source_cls: Any = model.get_submodule(name.rpartition(".")[0]).source_cls  # what replace_with_bnb_linear replaced
    if issubclass(source_cls, Conv1D):
        dense = dense.t()
    return dense.to("cpu").contiguous()
