"""Load base models and tokenizers: 4-bit NF4 on CUDA (QLoRA), full precision on CPU, or weightless on meta."""

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from sharelora_cli.errors import UserError, first_line
from sharelora_cli.paths import RECIPES_DIR
from sharelora_cli.recipe import ModelConfig, QuantizationConfig

log = logging.getLogger(__name__)

MODEL_CONFIGS_DIR = RECIPES_DIR / "models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """A local directory, a shipped architecture under recipes/models/, or a hub id (returned as is)."""
    if Path(name_or_path).exists():
        return name_or_path
    shipped = MODEL_CONFIGS_DIR / name_or_path
    if (shipped / "config.json").is_file():
        return str(shipped)
    return name_or_path


def load_config(name_or_path: str, key: str = "--model", trust_remote_code: bool = False) -> PretrainedConfig:
    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: cannot load a model config from '{name_or_path}': {first_line(err)}") from None


def build_on_meta(config: PretrainedConfig) -> nn.Module:
    """The model's modules with shapes but no storage: seconds even for 70B architectures."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(model_cfg: ModelConfig, quant: QuantizationConfig, device: torch.device) -> nn.Module:
    """The base model, frozen, on device; 4-bit NF4 with double quantisation when asked and on CUDA."""
    path = resolve_model_path(model_cfg.name_or_path)
    kwargs: dict = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    use_4bit = quant.load_in_4bit
    if use_4bit and device.type != "cuda":
        log.warning("quantization.load_in_4bit on %s uses bitsandbytes' CPU kernels: it works, but slower than a full-precision base (docs/benchmarks.md)", device)
    if use_4bit:
        kwargs["quantization_config"] = bnb_config(quant)
        kwargs["device_map"] = {"": device}
    kwargs["dtype"] = DTYPES[quant.compute_dtype] if use_4bit else resolve_dtype(model_cfg.dtype, device.type)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot load '{model_cfg.name_or_path}': {first_line(err)}") from None
    if use_4bit:
        prepare_for_kbit_training(model)
    else:
        model.to(device)
    model.requires_grad_(False)
    return model


def bnb_config(quant: QuantizationConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
    )


def prepare_for_kbit_training(model: nn.Module) -> None:
    """QLoRA's preparation: the few non-quantised weights (norms, embeddings, head) go to float32."""
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
            param.data = param.data.float()


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer with a pad token (eos when the model has none)."""
    path = resolve_model_path(name_or_path)
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from '{name_or_path}': {first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

