"""Shared fixtures: the tiny offline model is built once per test session from real GSM8K text."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sharelora_cli.core.paths import data_dir
from sharelora_cli.models.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = data_dir()
    if not (path / "gsm8k" / "train.jsonl").is_file():
        pytest.fail(f"benchmark data not found at {path}: set SHARELORA_DATA")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_data) -> Path:
    """A saved tiny Llama (random weights, BPE tokenizer trained on GSM8K), loadable with Auto* classes."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(params=["avx512-bf16", "no-avx512-bf16"])
def bnb_cpu_path(request, monkeypatch) -> bool:
    """Force which CPU path bitsandbytes takes, whatever this CPU has; returns whether it is AVX512-BF16's.

    Each Linear4bit reads the detection when it is built (bitsandbytes.nn.modules.has_avx512bf16), and
    with it would repack its weight for a bf16 kernel at the first eval-mode forward.
    """
    import bitsandbytes.nn.modules as modules

    detected = request.param == "avx512-bf16"
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: detected)
    return detected
