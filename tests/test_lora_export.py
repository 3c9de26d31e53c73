"""`sharelora export --format lora`: every method as one plain LoRA (one r) that PEFT loads with the adapter's logits."""

import json

import pytest
import torch
from numerics import assert_within, reordering_bound
from peft import PeftModel
from reference import adapter_config
from test_export import exported_tensors
from test_merge import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    METHODS,
    RANKS,
    assert_one_line_error,
    gpt2_dir,
    logits,
    make_adapter,
    run_cli,
)
from transformers import AutoModelForCausalLM

from sharelora_cli.adapters.adapter_io import load_adapter, read_adapter_config
from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.adapters.registry import METHODS as REGISTRY
from sharelora_cli.outputs.lora_export import REPORT_FILE

__all__ = ["gpt2_dir"]  # a fixture shared with test_merge

EVERY_METHOD = [*METHODS, "aslora"]
# Exact exports: the methods whose ΔW is a product of low-rank factors; full-rank ones are truncated (below).
EXACT_METHODS = [m for m in EVERY_METHOD if REGISTRY[m].layer_cls.update_form == "low_rank"]
FULL_RANK_METHODS = [m for m, method in REGISTRY.items() if method.layer_cls.update_form == "full_rank"]
# Logits of two fp32 evaluations of one model that differ only in the order of their sums (fused or plain
# adapter path, r padded with zeros) are what every merge/export test in this suite compares at 1e-5; the
# exactness of the export itself is checked per module against derived bounds (assert_same_delta on ΔW,
# assert_same_output on each module's real input in that forward).
LOGITS_ATOL = 1e-5


def export_lora(monkeypatch, capsys, adapter_dir, out, *args) -> tuple[dict, str]:
    code, output = run_cli(
        monkeypatch, capsys, "export", "--adapter", adapter_dir, "--format", "lora", "--out", out, *args
    )
    assert code == 0, output
    return json.loads((out / "adapter_config.json").read_text()), output


def adapted_and_peft(base_dir, adapter_dir, out):
    """(our adapted model, the PEFT model loaded from the export), each on its own copy of the base."""
    ours = AutoModelForCausalLM.from_pretrained(base_dir)
    load_adapter(ours, adapter_dir)
    return ours, PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)


def peft_delta(peft_model, path: str) -> torch.Tensor:
    module = peft_model.base_model.model.get_submodule(path)
    return module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)


def assert_same_delta(ours: AdaptedLayer, theirs: torch.Tensor) -> None:
    """PEFT's s·B A against ours: the same r-term products, and one more rounding where s was folded into B."""
    lora_A, lora_B, scaling = ours.low_rank()
    magnitude = abs(scaling) * (lora_B.abs() @ lora_A.abs())
    assert_within(theirs, ours.delta_weight(), reordering_bound(lora_A.shape[0] + 1, magnitude.detach()))


def module_inputs(peft_model, paths: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each adapted module of the PEFT model receives in one forward of ids."""
    captured: dict[str, torch.Tensor] = {}

    def keep(path):
        return lambda module, args: captured.__setitem__(path, args[0].detach())

    model = peft_model.base_model.model
    handles = [model.get_submodule(path).register_forward_pre_hook(keep(path)) for path in paths]
    logits(peft_model, ids)
    for handle in handles:
        handle.remove()
    return captured


def assert_same_output(ours: AdaptedLayer, theirs, x: torch.Tensor) -> None:
    """One module, one input: W x + s·B(A x) both ways differ by reordering the d_in- and r-term sums only.

    Two more roundings on the adapter's side: s folded into B (export) or applied after (ours), and the
    final addition; PEFT's scaling 1.0 is exact.
    """
    lora_A, lora_B, scaling = (t.detach() if isinstance(t, torch.Tensor) else t for t in ours.low_rank())
    weight = ours.base_layer.weight.detach()
    with torch.no_grad():
        expected, actual = ours(x), theirs(x)
    base_terms = x.abs() @ weight.abs().t()
    delta_terms = abs(scaling) * ((x.abs() @ lora_A.abs().t()) @ lora_B.abs().t())
    bound = reordering_bound(ours.d_in + 1, base_terms) + reordering_bound(ours.d_in + lora_A.shape[0] + 2, delta_terms)
    assert_within(actual, expected, bound)


def assert_plain_lora_config(config: dict, modules: list[str]) -> None:
    """What vLLM and SGLang need: LORA, one int r, scaling 1, no per-module patterns, nothing else saved."""
    assert config["peft_type"] == "LORA" and isinstance(config["r"], int)
    assert config["lora_alpha"] == config["r"] and config["use_rslora"] is False and config["use_dora"] is False
    assert "rank_pattern" not in config and "alpha_pattern" not in config and config["modules_to_save"] is None
    assert sorted(config["target_modules"]) == sorted(modules)


def adapted_modules(adapter_dir) -> list[str]:
    return [p for g in read_adapter_config(adapter_dir)["plan"].values() for p in g["modules"]]


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_lora_export_of_every_method_equals_the_adapter(method, tiny_model_dir, tmp_path, monkeypatch, capsys):
    config = adapter_config(method, rank=RANKS.get(method, 4), targets=LLAMA_TARGETS)
    adapter_dir, ids, before, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    peft_config, output = export_lora(monkeypatch, capsys, adapter_dir, tmp_path / "lora")
    modules = adapted_modules(adapter_dir)
    assert_plain_lora_config(peft_config, modules)
    assert peft_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert "exact" in output
    tensors = exported_tensors(tmp_path / "lora")
    assert set(tensors) == {f"base_model.model.{path}.lora_{f}.weight" for path in modules for f in "AB"}
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {peft_config["r"]}
    assert {t.shape[1] for k, t in tensors.items() if k.endswith("lora_B.weight")} == {peft_config["r"]}
    ours, peft_model = adapted_and_peft(tiny_model_dir, adapter_dir, tmp_path / "lora")
    inputs = module_inputs(peft_model, modules, ids)
    for path in modules:
        assert_same_delta(ours.get_submodule(path), peft_delta(peft_model, path))
        assert_same_output(ours.get_submodule(path), peft_model.base_model.model.get_submodule(path), inputs[path])
    assert (adapted - before).abs().max() > 0.01  # the adapter really changes the model
    torch.testing.assert_close(logits(peft_model, ids), adapted, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("method", ["miss", "vera", "tied-lora", "vblora"])
def test_lora_export_of_gpt2_conv1d(method, gpt2_dir, tmp_path, monkeypatch, capsys):
    config = adapter_config(method, rank=4, targets=GPT2_TARGETS)
    adapter_dir, ids, before, adapted = make_adapter(gpt2_dir, tmp_path / "adapter", config)
    peft_config, _ = export_lora(monkeypatch, capsys, adapter_dir, tmp_path / "lora")
    assert_plain_lora_config(peft_config, adapted_modules(adapter_dir))
    assert peft_config["fan_in_fan_out"] is True
    _, peft_model = adapted_and_peft(gpt2_dir, adapter_dir, tmp_path / "lora")
    assert (adapted - before).abs().max() > 0.01
    torch.testing.assert_close(logits(peft_model, ids), adapted, atol=LOGITS_ATOL, rtol=0)


def force_full_rank(monkeypatch) -> None:
    """LoRA through the full-rank path: its ΔW known to have rank 8, so the truncation's error is checkable."""
    monkeypatch.setattr(LoraLayer, "update_form", "full_rank")


@pytest.mark.parametrize("method", ["lora (forced full-rank)", *FULL_RANK_METHODS])
def test_full_rank_update_is_truncated_by_svd_with_its_error_reported(
    method, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    name = method.split()[0]
    config = adapter_config(name, rank=8, targets=LLAMA_TARGETS)
    adapter_dir, ids, _, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    if name == "lora":
        force_full_rank(monkeypatch)
    peft_config, output = export_lora(monkeypatch, capsys, adapter_dir, tmp_path / "lora", "--rank", "3")
    assert peft_config["r"] == 3 and "truncated SVD at rank 3" in output and REPORT_FILE in output
    report = json.loads((tmp_path / "lora" / REPORT_FILE).read_text())
    ours, peft_model = adapted_and_peft(tiny_model_dir, adapter_dir, tmp_path / "lora")
    for path, entry in report["modules"].items():
        exact = ours.get_submodule(path).delta_weight().detach().double()
        singular = torch.linalg.svdvals(exact)
        # Eckart–Young: the best rank-3 error is the tail of the singular values; the export reaches it.
        optimum = float(singular[3:].norm() / singular.norm())
        measured = float((peft_delta(peft_model, path).double() - exact).norm() / exact.norm())
        assert entry["form"] == "full_rank" and entry["relative_error"] > 0.1
        assert abs(entry["relative_error"] - optimum) <= 1e-5 * optimum  # fp32 factors of a float64 SVD
        assert abs(measured - entry["relative_error"]) <= 1e-5 * optimum
    printed_max = max(e["relative_error"] for e in report["modules"].values())
    assert f"max {printed_max:.3e}" in output
    truncated = logits(peft_model, ids)
    assert (truncated - adapted).abs().max() > 1e-3  # rank 3 of a rank-8 update is not the update


def test_svd_at_the_update_rank_is_exact(tiny_model_dir, tmp_path, monkeypatch, capsys):
    config = adapter_config("lora", rank=4, targets=LLAMA_TARGETS)
    adapter_dir, ids, _, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    force_full_rank(monkeypatch)
    peft_config, _ = export_lora(monkeypatch, capsys, adapter_dir, tmp_path / "lora")
    assert peft_config["r"] == 4  # --rank defaults to the adapter's rank
    report = json.loads((tmp_path / "lora" / REPORT_FILE).read_text())
    # The rank-4 tail of a rank-4 ΔW is zero: only fp32 rounding of the factors is left.
    assert max(e["relative_error"] for e in report["modules"].values()) < 1e-5
    _, peft_model = adapted_and_peft(tiny_model_dir, adapter_dir, tmp_path / "lora")
    torch.testing.assert_close(logits(peft_model, ids), adapted, atol=LOGITS_ATOL, rtol=0)


def test_layers_of_smaller_rank_are_zero_padded_to_one_r(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An SVD at rank 100 gives k_proj and v_proj (d_out 64) only 64 components: padded, they still give ΔW."""
    config = adapter_config("lora", rank=4, targets=LLAMA_TARGETS)
    adapter_dir, ids, _, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    force_full_rank(monkeypatch)
    peft_config, _ = export_lora(monkeypatch, capsys, adapter_dir, tmp_path / "lora", "--rank", "100")
    report = json.loads((tmp_path / "lora" / REPORT_FILE).read_text())
    assert peft_config["r"] == 100 and {e["rank"] for e in report["modules"].values()} == {64, 100}
    tensors = exported_tensors(tmp_path / "lora")
    k_proj_A = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    assert k_proj_A.shape[0] == 100 and not k_proj_A[64:].any()
    _, peft_model = adapted_and_peft(tiny_model_dir, adapter_dir, tmp_path / "lora")
    torch.testing.assert_close(logits(peft_model, ids), adapted, atol=LOGITS_ATOL, rtol=0)


def test_input_dependent_update_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", adapter_config("lora", rank=4))
    monkeypatch.setattr(LoraLayer, "update_form", "input_dependent")
    result = run_cli(
        monkeypatch, capsys, "export", "--adapter", adapter_dir, "--format", "lora", "--out", tmp_path / "o"
    )
    assert_one_line_error(*result, "input-dependent", "cannot be written as a LoRA")
    assert not (tmp_path / "o").exists()


def test_max_rank_and_rank_flags_are_checked(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", adapter_config("vera", rank=16))
    base = ["export", "--adapter", adapter_dir, "--out", tmp_path / "o"]
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, *base, "--format", "lora", "--max-rank", "8"),
        "needs r = 16, above --max-rank 8",
    )
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, *base, "--format", "peft", "--max-rank", "8"), "--format lora only"
    )
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, *base, "--format", "lora", "--rank", "0"), "--rank must be a positive integer"
    )
    assert not (tmp_path / "o").exists()
    peft_config, _ = export_lora(monkeypatch, capsys, adapter_dir, tmp_path / "o", "--max-rank", "16")
    assert peft_config["r"] == 16
