"""TinyLoRA: PEFT's SVD factors, P's, tie groups and counts; PEFT's outputs and gradients; a 4-bit base.

Tolerances as in tests/test_randlora.py: the same float32 sums in other orders, the longest over d_in ≤ 320,
bounded by 2·γ_320 relative to magnitudes of order 1 (TOLERANCE). On a 4-bit base PEFT has no TinyLoRA, so the
reference is PEFT's TinyLoRA on a full-precision copy of the base holding the dequantised weights.
"""

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from peft import TinyLoraConfig, get_peft_model
from reference import adapter_config, randomize_factors
from safetensors.torch import load_file
from test_export import export, exported_tensors, peft_logits
from test_merge import GPT2_TARGETS, gpt2_dir, make_adapter
from test_peft_parity import fused_groups, peft_layers
from test_qlora_cpu import NF4
from test_randlora import TOLERANCE, assert_matches_peft, train_4bit_and_merge
from tiny_architectures import LLAMA_TARGETS, load_tiny_llama

from sharelora_cli.adapters.adapter_io import WEIGHTS_FILE, load_adapter, read_adapter_config, save_adapter
from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import ModelConfig
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.quantization import dequantized_weight

FROZEN = ("tinylora_A", "tinylora_B", "tinylora_P")

__all__ = ["gpt2_dir"]  # a fixture shared with test_merge


def tinylora(model, rank: int = 4, u: int = 8, tying: float = 0.0, seed: int = 42):
    settings = {"u": u, "weight_tying": tying, "projection_seed": seed}
    return inject_adapter(model, adapter_config("tinylora", rank=rank, targets=LLAMA_TARGETS, tinylora=settings))


def peft_tinylora(model, rank: int = 4, u: int = 8, tying: float = 0.0, seed: int = 42):
    config = TinyLoraConfig(r=rank, u=u, weight_tying=tying, projection_seed=seed, target_modules=LLAMA_TARGETS)
    return get_peft_model(model, config)


def test_inspect_prints_the_llama7b_count():
    """LLaMA-7B, all seven projections, PEFT's defaults (u = 64, no tying): one v of 64 per module,
    7 projections × 32 layers = 224 modules, 224 × 64 = 14,336 trainable, whatever the SVD rank (A, B, P are
    frozen). With weight_tying = 1 the whole model trains one v: 64."""
    args = ["inspect", "--model", "llama-7b", "--rank", "2", "--targets", ",".join(LLAMA_TARGETS), "--json"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tinylora"] == 14_336


@pytest.mark.parametrize("tying", [0.0, 0.3, 0.5, 1.0])
def test_count_tie_groups_and_frozen_factors_equal_peft_s(tiny_model, tiny_model_dir, tying):
    adapter = tinylora(tiny_model, tying=tying)
    peft_model = peft_tinylora(load_tiny_llama(tiny_model_dir), tying=tying)
    assert adapter.num_trainable() == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # 28 modules: round(28·(1 − tying)) v's of u = 8.
    assert adapter.num_trainable() == 8 * max(1, round(28 * (1 - tying)))
    for ours, theirs in peft_layers(adapter, peft_model):
        assert str(ours.tie_group) == theirs._tinylora_v_key["default"]
        for name in FROZEN:  # the same SVD of the same weight, the same seeded draws: bit for bit
            assert torch.equal(getattr(ours, name), getattr(theirs, name)["default"]), name
            assert not getattr(ours, name).requires_grad
        assert torch.equal(ours.delta_weight(), torch.zeros(ours.d_out, ours.d_in))  # v starts at zero


def copy_v(adapter, peft_model) -> None:
    """Random v's (ours) copied into PEFT's, one per tie group."""
    randomize_factors(adapter, seed=12, scale=0.3)
    theirs = peft_model.base_model.tinylora_v["default"]
    with torch.no_grad():
        for k, row in enumerate(adapter.shared["tinylora_v"]):
            theirs[str(k)].copy_(row)


def assert_matches_peft_v(ours, peft_model, adapter) -> None:
    """Same logits, and our (groups × u) v's gradient equal to PEFT's per-group v's gradients stacked."""
    assert_matches_peft(ours, peft_model, [])
    rows = peft_model.base_model.tinylora_v["default"]
    theirs = torch.stack([rows[str(k)].grad for k in range(len(rows))])
    mine = adapter.shared["tinylora_v"].grad
    assert mine.abs().max() > 0
    torch.testing.assert_close(mine, theirs, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("tying", [0.0, 0.5, 1.0])
def test_outputs_and_gradients_match_peft(tiny_model, tiny_model_dir, tying):
    adapter = tinylora(tiny_model, tying=tying, seed=7)
    peft_model = peft_tinylora(load_tiny_llama(tiny_model_dir), tying=tying, seed=7)
    copy_v(adapter, peft_model)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # v really moves the logits
        assert (tiny_model(tokens).logits - load_tiny_llama(tiny_model_dir)(tokens).logits).abs().max() > 0.01
    assert_matches_peft_v(tiny_model, peft_model, adapter)
    assert fused_groups(adapter) == [1, 2, 3]


def dequantised_copy(model_dir: Path, quantized) -> torch.nn.Module:
    """The full-precision tiny model with every 4-bit linear's weight replaced by its dequantised weight."""
    dense = load_tiny_llama(model_dir)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
                dense.get_submodule(name).weight.copy_(dequantized_weight(module))
    return dense


def test_on_a_4bit_base_the_svd_is_of_the_dequantised_weight_and_matches_peft_there(tiny_model_dir, bnb_cpu_path):
    quantized = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), NF4["float32"], torch.device("cpu"))
    peft_model = peft_tinylora(dequantised_copy(tiny_model_dir, quantized), tying=0.5, seed=3)
    adapter = tinylora(quantized, tying=0.5, seed=3)
    for ours, theirs in peft_layers(adapter, peft_model):
        for name in FROZEN:
            assert torch.equal(getattr(ours, name), getattr(theirs, name)["default"]), name
    copy_v(adapter, peft_model)
    find_shared_inputs(quantized, torch.device("cpu"))
    assert_matches_peft_v(quantized, peft_model, adapter)


def test_saved_factors_load_into_a_fresh_base_with_the_same_outputs(tiny_model, tiny_model_dir, tmp_path):
    adapter = tinylora(tiny_model, tying=0.5)
    randomize_factors(adapter, scale=0.3)
    save_adapter(adapter, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / WEIGHTS_FILE)
    assert len(saved) == 3 * len(adapter.layers()) + 1  # A, B, P per module; the v's as one tensor
    fresh = load_tiny_llama(tiny_model_dir)
    load_adapter(fresh, tmp_path / "adapter")
    tokens = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, tiny_model(tokens).logits)


def test_trains_on_a_4bit_base_and_merges_into_it(tmp_path, tiny_model_dir):
    # One v of PEFT's default u = 64 per module: 7 projections × 4 layers.
    assert train_4bit_and_merge(tmp_path, tiny_model_dir, "tinylora", lr=3e-2) == 28 * 64


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_loads_in_peft_with_the_adapted_logits(arch, tiny_model_dir, gpt2_dir, tmp_path, monkeypatch, capsys):
    base_dir, targets = (tiny_model_dir, LLAMA_TARGETS) if arch == "llama" else (gpt2_dir, GPT2_TARGETS)
    settings = {"u": 8, "weight_tying": 0.5, "projection_seed": 3}
    config = adapter_config("tinylora", rank=4, targets=targets, tinylora=settings)
    adapter_dir, ids, before, adapted = make_adapter(base_dir, tmp_path / "adapter", config)
    peft_config = export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    assert (peft_config["peft_type"], peft_config["r"], peft_config["u"]) == ("TINYLORA", 4, 8)
    assert peft_config["weight_tying"] == 0.5 and peft_config["fan_in_fan_out"] is (arch == "gpt2")
    modules = [p for g in read_adapter_config(adapter_dir)["plan"].values() for p in g["modules"]]
    groups = max(1, round(len(modules) * 0.5))
    assert set(exported_tensors(tmp_path / "peft")) == {f"base_model.tinylora_v.{k}" for k in range(groups)} | {
        f"base_model.model.{path}.tinylora_{name}" for path in modules for name in "ABP"
    }
    assert (adapted - before).abs().max() > 0.01
    exported = peft_logits(base_dir, tmp_path / "peft", ids)
    torch.testing.assert_close(exported, adapted, atol=TOLERANCE, rtol=TOLERANCE)
