"""`sharelora export --format peft`: PeftModel.from_pretrained on the export gives the adapted model's logits."""

import json

import pytest
import torch
from peft import PeftModel
from reference import adapter_config
from safetensors import safe_open
from test_merge import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    RANKS,
    assert_one_line_error,
    gpt2_dir,
    logits,
    make_adapter,
    run_cli,
)
from transformers import AutoModelForCausalLM

from sharelora_cli.adapters.adapter_io import read_adapter_config
from sharelora_cli.config.recipe import AdapterConfig

__all__ = ["gpt2_dir"]  # a fixture shared with test_merge


def export(monkeypatch, capsys, adapter_dir, out, *args):
    code, output = run_cli(
        monkeypatch, capsys, "export", "--adapter", adapter_dir, "--format", "peft", "--out", out, *args
    )
    assert code == 0, output
    return json.loads((out / "adapter_config.json").read_text())


def exported_tensors(out) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def peft_logits(base_dir, out, ids) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out), ids)


@pytest.mark.parametrize("method", ["lora", "sharea", "shareb", "shareab"])
def test_peft_lora_export_equals_adapted_llama(method, tiny_model_dir, tmp_path, monkeypatch, capsys):
    config = AdapterConfig(method=method, rank=4, alpha=8, targets=LLAMA_TARGETS, rslora=method == "sharea")
    adapter_dir, ids, before, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    peft_config = export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    modules = [p for g in read_adapter_config(adapter_dir)["plan"].values() for p in g["modules"]]
    assert (peft_config["peft_type"], peft_config["r"], peft_config["lora_alpha"]) == ("LORA", 4, 8)
    assert peft_config["use_rslora"] is (method == "sharea")
    assert sorted(peft_config["target_modules"]) == sorted(modules)
    assert peft_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(exported_tensors(tmp_path / "peft")) == {
        f"base_model.model.{path}.lora_{f}.weight" for path in modules for f in "AB"
    }
    assert (adapted - before).abs().max() > 0.1
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "peft", ids), adapted, atol=1e-5, rtol=0)


def test_shared_factor_is_written_once_per_layer(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(method="sharea", rank=4))
    export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    tensors = exported_tensors(tmp_path / "peft")
    a = [tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] for i in range(4)]
    b = [tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] for i in range(4)]
    assert all(torch.equal(a[0], other) for other in a[1:])
    assert not torch.equal(b[0], b[1])


def test_export_follows_any_sharing_plan(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An ASLoRA-style plan (A global, B merged into groups) exports from the plan alone."""
    plan = {
        "q_proj": {
            "modules": [f"model.layers.{i}.self_attn.q_proj" for i in range(4)],
            "d_in": 128,
            "d_out": 128,
            "index": {"lora_A": [0, 0, 0, 0], "lora_B": [0, 1, 1, 0]},
        },
        "v_proj": {
            "modules": [f"model.layers.{i}.self_attn.v_proj" for i in range(4)],
            "d_in": 128,
            "d_out": 64,
            "index": {"lora_A": [0, 0, 0, 0], "lora_B": [0, 1, 2, 2]},
        },
    }
    config = AdapterConfig(method="sharea", rank=4)
    adapter_dir, ids, _, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config, plan=plan)
    export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    tensors = exported_tensors(tmp_path / "peft")
    b = [tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] for i in range(4)]
    assert torch.equal(b[0], b[3]) and torch.equal(b[1], b[2]) and not torch.equal(b[0], b[1])
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "peft", ids), adapted, atol=1e-5, rtol=0)


def test_peft_lora_export_of_gpt2_conv1d(gpt2_dir, tmp_path, monkeypatch, capsys):
    config = AdapterConfig(method="shareb", rank=4, targets=GPT2_TARGETS)
    adapter_dir, ids, _, adapted = make_adapter(gpt2_dir, tmp_path / "adapter", config)
    assert export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")["fan_in_fan_out"] is True
    torch.testing.assert_close(peft_logits(gpt2_dir, tmp_path / "peft", ids), adapted, atol=1e-5, rtol=0)


def test_miss_export_equals_peft_miss(tiny_model_dir, tmp_path, monkeypatch, capsys):
    config = AdapterConfig(method="miss", rank=RANKS["miss"], targets=LLAMA_TARGETS)
    adapter_dir, ids, before, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    peft_config = export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    assert (peft_config["peft_type"], peft_config["r"], peft_config["init_weights"]) == ("MISS", 6, True)
    assert all(key.endswith(".miss_block") for key in exported_tensors(tmp_path / "peft"))
    assert (adapted - before).abs().max() > 0.1
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "peft", ids), adapted, atol=1e-5, rtol=0)


def test_miss_on_conv1d_points_to_merge(gpt2_dir, tmp_path, monkeypatch, capsys):
    config = AdapterConfig(method="miss", rank=4, targets=GPT2_TARGETS)
    adapter_dir, *_ = make_adapter(gpt2_dir, tmp_path / "adapter", config)
    result = run_cli(
        monkeypatch, capsys, "export", "--adapter", adapter_dir, "--format", "peft", "--out", tmp_path / "p"
    )
    assert_one_line_error(*result, "Conv1D", "sharelora merge")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vera_export_equals_peft_vera(arch, tiny_model_dir, gpt2_dir, tmp_path, monkeypatch, capsys):
    base_dir, targets = (tiny_model_dir, LLAMA_TARGETS) if arch == "llama" else (gpt2_dir, GPT2_TARGETS)
    config = adapter_config("vera", rank=4, targets=targets, vera={"projection_seed": 3, "d_initial": 0.05})
    adapter_dir, ids, before, adapted = make_adapter(base_dir, tmp_path / "adapter", config)
    peft_config = export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    assert (peft_config["peft_type"], peft_config["r"], peft_config["projection_prng_key"]) == ("VERA", 4, 3)
    assert peft_config["save_projection"] is True and peft_config["fan_in_fan_out"] is (arch == "gpt2")
    tensors = exported_tensors(tmp_path / "peft")
    modules = [p for g in read_adapter_config(adapter_dir)["plan"].values() for p in g["modules"]]
    assert set(tensors) == {"base_model.vera_A", "base_model.vera_B"} | {
        f"base_model.model.{path}.vera_lambda_{v}" for path in modules for v in "bd"
    }
    assert (adapted - before).abs().max() > 0.01
    torch.testing.assert_close(peft_logits(base_dir, tmp_path / "peft", ids), adapted, atol=1e-5, rtol=0)


def test_vblora_export_equals_peft_vblora(tiny_model_dir, tmp_path, monkeypatch, capsys):
    config = adapter_config(
        "vblora", rank=4, targets=LLAMA_TARGETS, vblora={"num_vectors": 12, "vector_length": 32, "topk": 3}
    )
    adapter_dir, ids, before, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    peft_config = export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    assert (
        peft_config["peft_type"],
        peft_config["num_vectors"],
        peft_config["vector_length"],
        peft_config["topk"],
        peft_config["save_only_topk_weights"],
    ) == ("VBLORA", 12, 32, 3, False)
    tensors = exported_tensors(tmp_path / "peft")
    assert tensors["base_model.vblora_vector_bank"].shape == (12, 32)
    assert sum(key.endswith(("vblora_logits_A", "vblora_logits_B")) for key in tensors) == 2 * 7 * 4
    assert (adapted - before).abs().max() > 0.01
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "peft", ids), adapted, atol=1e-5, rtol=0)


def test_tied_lora_has_no_peft_format_and_points_to_merge(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", adapter_config("tied-lora", rank=4))
    result = run_cli(
        monkeypatch, capsys, "export", "--adapter", adapter_dir, "--format", "peft", "--out", tmp_path / "p"
    )
    assert_one_line_error(*result, "tied-lora", "no PEFT format", "sharelora merge")
    assert not (tmp_path / "p").exists()


def test_export_refusals(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(rank=4))
    (tmp_path / "taken").mkdir()
    base = ["export", "--adapter", adapter_dir]
    assert_one_line_error(*run_cli(monkeypatch, capsys, *base, "--out", tmp_path / "taken"), "already exists")
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, *base, "--out", tmp_path / "o", "--format", "gguf"),
        "--format must be one of peft",
    )
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, "export", "--adapter", tmp_path / "nowhere", "--out", tmp_path / "o"),
        "sharelora_config.json not found",
    )
    code, output = run_cli(monkeypatch, capsys, *base, "--out", tmp_path / "taken", "--overwrite")
    assert code == 0 and (tmp_path / "taken" / "adapter_model.safetensors").is_file(), output
