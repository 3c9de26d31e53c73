"""`sharelora generate`: a trained model's completion of one prompt, rendered as its training examples were.

The adapter records its base model and its training data.format (gsm8k, alpaca, chat, text): the prompt
becomes the prompt part of such an example, tokenized as training tokenized it (bos added except for chat
templates, which write their own), so the model sees what it learned to continue.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharelora_cli.adapters.adapter_io import load_adapter
from sharelora_cli.config.recipe import ModelConfig, QuantizationConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.data.examples import adds_special_tokens, prompt_in_format
from sharelora_cli.evaluation import trained_with
from sharelora_cli.models.loading import load_model, load_tokenizer

RAW_FORMAT = "text"  # a text example has no prompt template: the prompt goes as it is


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    adapter: Path | None = None
    model: str | None = None
    max_new_tokens: int = 256
    no_adapter: bool = False
    raw: bool = False
    # 0: greedy decoding; above 0, sampled with top_p and seed.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Prepared:
    """What the model is given: its base and how it loads, the prompt as text and as token ids."""

    base: str
    quantization: QuantizationConfig
    tokenizer: Any
    text: str
    input_ids: list[int]


def check_request(request: GenerateRequest) -> None:
    if request.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be a positive integer, got {request.max_new_tokens}")
    if request.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {request.top_p}")


def prepare(request: GenerateRequest) -> Prepared:
    """Find the base (and how training loaded it), render the prompt in the training format and tokenize it."""
    adapter = request.adapter
    if request.model:
        base, source = request.model, "--model"
    elif adapter is not None:
        base, source = trained_with.base_model(adapter), f"the base_model recorded in {adapter} (or pass --model)"
    else:
        raise UserError("generate needs --adapter RUN_DIR/adapter (its base and prompt format) or --model PATH_OR_ID")
    tokenizer = load_tokenizer(base, key=source)
    quantization = QuantizationConfig.model_validate(trained_with.quantization(adapter) or {}) if adapter else None
    fmt = (
        RAW_FORMAT
        if request.raw or adapter is None
        else trained_with.data_format(adapter, "pass --raw to send the prompt as it is")
    )
    text = prompt_in_format(request.prompt, fmt, tokenizer)
    input_ids = tokenizer(text, add_special_tokens=adds_special_tokens(fmt))["input_ids"]
    return Prepared(base, quantization or QuantizationConfig(), tokenizer, text, input_ids)


@dataclass(frozen=True)
class Completion:
    prompt: str  # the prompt as the model saw it (rendered in the training format)
    prompt_ids: list[int]
    completion: str  # the new tokens decoded, special tokens left out
    completion_ids: list[int]


def generate(request: GenerateRequest) -> Completion:
    """The completion of the prompt: new tokens up to eos or max_new_tokens."""
    check_request(request)
    prepared = prepare(request)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ModelConfig(name_or_path=prepared.base), prepared.quantization, device)
    if request.adapter is not None and not request.no_adapter:
        load_adapter(model, request.adapter)
    model = model.eval()
    input_ids = torch.tensor([prepared.input_ids], device=device)
    sampling = (
        {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
        if request.temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    torch.manual_seed(request.seed)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=request.max_new_tokens,
            pad_token_id=prepared.tokenizer.pad_token_id,
            **sampling,
        )
    new_ids = output[0, input_ids.shape[1] :].tolist()
    text = prepared.tokenizer.decode(new_ids, skip_special_tokens=True)
    return Completion(prepared.text, prepared.input_ids, text, new_ids)
