"""A 4-bit NF4 base on CPU (bitsandbytes' CPU kernels): adapters wrap Linear4bit and train."""

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from safetensors.torch import load_file

from sharelora_cli.inject import inject_adapter
from sharelora_cli.modeling import load_model
from sharelora_cli.recipe import AdapterConfig, ModelConfig, QuantizationConfig, load_recipe
from sharelora_cli.train import train
from test_train import read_metrics, write_recipe

NF4_FP32 = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")


@pytest.mark.parametrize("method", ["lora", "shareab", "miss"])
def test_adapted_linear4bit_is_dequantized_base_plus_delta(tiny_model_dir, method):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), NF4_FP32, torch.device("cpu"))
    adapter = inject_adapter(model, AdapterConfig(method=method, rank=4, targets=["q_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for factor in adapter.parameters():
            factor.normal_(0, 0.1)
    for layer in adapter.layers():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        weight = layer.base_layer.weight
        dense = dequantize_4bit(weight.data, weight.quant_state).float()
        x = torch.randn(3, 5, layer.d_in)
        expected = x @ dense.t() + x @ layer.delta_weight().t()
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


def test_training_on_a_4bit_base_updates_only_the_adapter(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, quantization=NF4_FP32.model_dump(),
                        train={"max_steps": 8, "eval_every": 4, "checkpoint_every": 4})
    recipe = load_recipe(str(path))
    summary = train(recipe)
    run = Path(recipe.output_dir)
    val = [m["val_loss"] for m in read_metrics(run) if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]
    tensors = load_file(run / "adapter" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(name.split(".")[1] == "lora_B" and t.abs().max() > 0 for name, t in tensors.items())
    saved = json.loads((run / "adapter" / "sharelora_config.json").read_text())
    assert saved["quantization"]["load_in_4bit"] and summary.trainable_parameters == sum(t.numel() for t in tensors.values())
