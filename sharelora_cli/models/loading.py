"""Load base models and tokenizers: 4-bit NF4 on CUDA (QLoRA), full precision on CPU, or weightless on meta."""

import logging
import re
from pathlib import Path

import torch
from huggingface_hub.constants import HF_HUB_OFFLINE
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sharelora_cli.config.recipe import ModelConfig, QuantizationConfig
from sharelora_cli.core.errors import UserError, first_line
from sharelora_cli.core.paths import RECIPES_DIR
from sharelora_cli.models.quantization import bnb_config, prepare_for_kbit_training

log = logging.getLogger(__name__)

MODEL_CONFIGS_DIR = RECIPES_DIR / "models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# What the hub accepts as a repo id ("name" or "org/name"); anything else can only be a local path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Where the project's scripts write the models they build (git-ignored).
ARTIFACTS = "artifacts"


def resolve_model_path(name_or_path: str, key: str = "model.name_or_path") -> str:
    """A local directory, a shipped architecture under recipes/models/, or a hub id (returned as is)."""
    if Path(name_or_path).exists():
        return name_or_path
    shipped = MODEL_CONFIGS_DIR / name_or_path
    if (shipped / "config.json").is_file():
        return str(shipped)
    if is_local_path(name_or_path):
        raise UserError(f"{key}: directory '{name_or_path}' does not exist{build_hint(name_or_path)}")
    return name_or_path


def is_local_path(name: str) -> bool:
    """Not a hub id, or under a local directory that exists (e.g. runs/x), or under artifacts/."""
    top = name.split("/", 1)[0]
    return not HUB_ID.fullmatch(name) or ("/" in name and (Path(top).is_dir() or top == ARTIFACTS))


def build_hint(name: str) -> str:
    if Path(name).parent.name != ARTIFACTS:
        return ""
    return f"; the project builds its models there: run `bash scripts/quickstart.sh` or `python scripts/make_tiny_model.py {name}`"


def load_failure(key: str, what: str, name_or_path: str, err: Exception) -> UserError:
    """Why a model could not be loaded; for a hub id with the hub switched off, what to do about it."""
    message = f"{key}: cannot load {what} from '{name_or_path}': {first_line(err)}"
    if HF_HUB_OFFLINE and not is_local_path(name_or_path):
        message += (
            f"; HF_HUB_OFFLINE is set, so '{name_or_path}' must be in the hub cache: download it where the hub is "
            "reachable (`hf download ...`) or give a local model directory"
        )
    return UserError(message)


def load_config(name_or_path: str, key: str = "--model", trust_remote_code: bool = False) -> PretrainedConfig:
    path = resolve_model_path(name_or_path, key)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_failure(key, "a model config", name_or_path, err) from None


def build_on_meta(config: PretrainedConfig) -> nn.Module:
    """The model's modules with shapes but no storage: seconds even for 70B architectures."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(
    model_cfg: ModelConfig, quant: QuantizationConfig, device: torch.device, sharded: bool = False
) -> PreTrainedModel:
    """The base model, frozen, on device; 4-bit NF4 with double quantisation when asked (stored for FSDP2 when sharded)."""
    path = resolve_model_path(model_cfg.name_or_path)
    kwargs: dict = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    use_4bit = quant.load_in_4bit
    if use_4bit and device.type != "cuda":
        log.warning(
            "quantization.load_in_4bit on %s uses bitsandbytes' CPU kernels: it works, but slower than a full-precision base (docs/benchmarks.md)",
            device,
        )
    if use_4bit:
        kwargs["quantization_config"] = bnb_config(quant, sharded)
        kwargs["device_map"] = {"": device}
    kwargs["dtype"] = DTYPES[quant.compute_dtype] if use_4bit else resolve_dtype(model_cfg.dtype, device.type)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise load_failure("model.name_or_path", "a model", model_cfg.name_or_path, err) from None
    if use_4bit:
        prepare_for_kbit_training(model)
    else:
        model.to(device)  # type: ignore[arg-type]  # transformers wraps .to in a decorator mypy reads as unbound
    model.requires_grad_(False)
    return model


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, key: str = "model.name_or_path"
):
    """The tokenizer with a pad token (eos when the model has none); key: what errors name as the source of name_or_path."""
    path = resolve_model_path(name_or_path, key)
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise load_failure(key, "a tokenizer", name_or_path, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
