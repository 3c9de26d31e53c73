"""VeRA, Tied-LoRA, VB-LoRA, RandLoRA and TinyLoRA through `sharelora train` on the tiny model and GSM8K: the loss falls, a run resumed
from a checkpoint ends with exactly the uninterrupted run's adapter, and the trained adapter merges (and, where
PEFT has the method, exports) to the same logits."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from reference import METHOD_OPTIONS
from safetensors.torch import load_file
from test_train import read_metrics, train_and_resume, write_recipe
from transformers import AutoModelForCausalLM

from sharelora_cli.adapters.adapter_io import load_adapter
from sharelora_cli.outputs.export import export_adapter
from sharelora_cli.outputs.merge import merge_adapter

METHODS = ["vera", "tied-lora", "vblora", "randlora", "tinylora"]
# VeRA trains only scaling vectors and, as in its paper, needs a larger learning rate than LoRA-like methods;
# TinyLoRA trains u = 64 mixture weights per module.
LEARNING_RATES = {"vera": 3e-2, "tinylora": 3e-2}


@pytest.fixture(scope="module", params=METHODS)
def runs(request, tmp_path_factory, tiny_model_dir) -> dict:
    """An uninterrupted 8-step run, and the same run resumed from checkpoint-5 as if killed right after writing it."""
    method = request.param
    tmp = tmp_path_factory.mktemp(method)
    adapter = {"method": method, "dropout": 0.1, **METHOD_OPTIONS.get(method, {})}
    recipe = write_recipe(
        tmp,
        tiny_model_dir,
        adapter=adapter,
        train={"max_steps": 8, "lr": LEARNING_RATES.get(method, 1e-2), "eval_every": 4, "checkpoint_every": 5},
    )
    return {"method": method, **train_and_resume(recipe, tmp)}


def test_validation_loss_falls(runs):
    val = [m["val_loss"] for m in read_metrics(runs["full"]) if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]


def test_resumed_run_ends_with_the_uninterrupted_adapter(runs):
    assert (runs["full"] / "checkpoint-5").is_dir()
    full = load_file(runs["full"] / "adapter" / "adapter.safetensors")
    resumed = load_file(runs["resumed"] / "adapter" / "adapter.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0)
    config = json.loads((runs["full"] / "adapter" / "sharelora_config.json").read_text())
    assert config["trainable_parameters"] == runs["trainable"]
    assert [m["step"] for m in read_metrics(runs["resumed"])] == list(range(1, 9))


def test_trained_adapter_merges_and_exports_to_the_adapted_logits(runs, tiny_model_dir, tmp_path):
    adapter_dir = runs["full"] / "adapter"
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    adapted = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_adapter(adapted, adapter_dir)
    adapted.eval()  # after injecting: the adapter's dropout (0.1 here) is off only in eval mode
    with torch.no_grad():
        expected = adapted(ids).logits
        merge_adapter(adapter_dir, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
        if runs["method"] == "tied-lora":  # no PEFT format (tests/test_export.py checks the refusal)
            return
        export_adapter(adapter_dir, Path(tmp_path / "peft"))
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
