"""RandLoRA: PEFT's bases from the same seed, PEFT's counts, outputs and gradients, on a full-precision and a 4-bit base.

Tolerances: both sides evaluate the same float32 products and sums, only blocked and ordered differently
(the fused kernel, PEFT's UniqueBaseGrad); tests/numerics.py bounds such a reordering by 2·γ_n·Σ|terms|.
The longest sum here runs over d_in ≤ 320 (a projection) or the r·n ≤ 320 inner terms of ΔW x, so
2·γ_320 ≈ 3.8e-5 relative to the summed magnitudes, which are of order 1 for the logits and gradients
compared (RMSNorm before every projection and the head): TOLERANCE, used as atol and rtol.
"""

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from numerics import reordering_bound
from peft import RandLoraConfig, get_peft_model
from reference import adapter_config, llama_module_types, randomize_factors, trainable_count
from safetensors.torch import load_file
from test_export import export, exported_tensors, peft_logits
from test_merge import GPT2_TARGETS, gpt2_dir, make_adapter
from test_peft_parity import fused_groups, peft_layers
from test_qlora_cpu import NF4
from test_train import read_metrics, write_recipe
from tiny_architectures import LLAMA_TARGETS, load_tiny_llama
from transformers import AutoModelForCausalLM

from sharelora_cli.adapters.adapter_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter_config, save_adapter
from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import ModelConfig, load_recipe
from sharelora_cli.models.loading import load_model
from sharelora_cli.outputs.merge import merge_adapter
from sharelora_cli.training.loop import train

FACTORS = ("randlora_lambda", "randlora_gamma")
TOLERANCE = reordering_bound(320, 1.0)  # module docstring

__all__ = ["gpt2_dir"]  # a fixture shared with test_merge


def assert_matches_peft(ours, theirs, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Same logits, and the same gradient for every (our tensor, PEFT's tensor) pair after the same loss."""
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(8))
    ours_out, theirs_out = ours(tokens, labels=tokens), theirs(input_ids=tokens, labels=tokens)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, atol=TOLERANCE, rtol=TOLERANCE)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for mine, peft_tensor in pairs:
        assert mine.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, peft_tensor.grad, atol=TOLERANCE, rtol=TOLERANCE)


def randlora(model, rank: int = 16, seed: int = 0, alpha: float = 16.0):
    config = adapter_config(
        "randlora", rank=rank, alpha=alpha, targets=LLAMA_TARGETS, randlora={"projection_seed": seed}
    )
    return inject_adapter(model, config)


def peft_randlora(model, rank: int = 16, seed: int = 0, alpha: float = 16.0):
    config = RandLoraConfig(r=rank, randlora_alpha=alpha, target_modules=LLAMA_TARGETS, projection_prng_key=seed)
    return get_peft_model(model, config)


def test_inspect_prints_the_llama7b_count():
    """LLaMA-7B (d = 4096, ffn = 11008, L = 32), basis rank r = 64, all seven projections.

    Every projection's smaller side is 4096 (q k v o 4096→4096, gate up 4096→11008, down 11008→4096), so
    each has n = 4096/64 = 64 bases and trains λ (64 × 64 = 4,096) and γ (64 × 4096 = 262,144): 266,240.
    7 projections × 32 layers × 266,240 = 59,637,760 (LoRA at r = 64: 159,907,840). The bases are frozen.
    """
    result = run_cli("inspect", "--model", "llama-7b", "--rank", "64", "--targets", ",".join(LLAMA_TARGETS), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["randlora"] == 59_637_760
    assert trainable_count("randlora", 64, llama_module_types(4096, 11008, 32, 4096, LLAMA_TARGETS)) == 59_637_760


@pytest.mark.parametrize("rank", [16, 48], ids=["r-divides", "r-rounds-up"])
def test_trainable_count_equals_peft_s(tiny_model, tiny_model_dir, rank):
    adapter = randlora(tiny_model, rank=rank)
    peft_model = peft_randlora(load_tiny_llama(tiny_model_dir), rank=rank)
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert adapter.num_trainable() == peft_trainable > 0


@pytest.mark.parametrize("seed", [0, 1234])
def test_regenerates_peft_s_bases_and_initial_scalings(tiny_model, tiny_model_dir, seed):
    adapter = randlora(tiny_model, seed=seed)
    peft_model = peft_randlora(load_tiny_llama(tiny_model_dir), seed=seed)
    for name in ("randlora_A", "randlora_B"):
        assert torch.equal(adapter.shared[name], getattr(peft_model.base_model, name)["default"].float()), name
    # Largest d_in is down_proj's 320, largest d_out gate/up's 320: min side 320, n = 320/16 = 20 bases.
    assert adapter.shared["randlora_A"].shape == (16, 1, 320) and adapter.shared["randlora_B"].shape == (320, 20, 16)
    for ours, theirs in peft_layers(adapter, peft_model):
        for name in FACTORS:
            assert torch.equal(getattr(ours, name), getattr(theirs, name)["default"]), name
        assert torch.equal(ours.delta_weight(), torch.zeros(ours.d_out, ours.d_in))


def copy_scalings(adapter, peft_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our random λ, γ copied into PEFT's layers; the (ours, theirs) pairs whose gradients must agree."""
    # λ, γ ~ N(0, 0.05²): ΔW moves the logits by about 1, as much as a trained adapter, without blowing up activations.
    randomize_factors(adapter, seed=12, scale=0.05)
    pairs = []
    with torch.no_grad():
        for ours, theirs in peft_layers(adapter, peft_model):
            for name in FACTORS:
                getattr(theirs, name)["default"].copy_(getattr(ours, name))
                pairs.append((getattr(ours, name), getattr(theirs, name)["default"]))
    return pairs


@pytest.mark.parametrize("rank", [16, 48], ids=["r-divides", "r-rounds-up"])
def test_outputs_and_gradients_match_peft(tiny_model, tiny_model_dir, rank):
    adapter = randlora(tiny_model, rank=rank, seed=5)
    peft_model = peft_randlora(load_tiny_llama(tiny_model_dir), rank=rank, seed=5)
    pairs = copy_scalings(adapter, peft_model)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    with torch.no_grad():  # the scalings really move the logits, so agreeing is not agreeing with the base
        tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(8))
        assert (tiny_model(tokens).logits - load_tiny_llama(tiny_model_dir)(tokens).logits).abs().max() > 0.01
    assert_matches_peft(tiny_model, peft_model, pairs)
    assert fused_groups(adapter) == [1, 2, 3]


def test_on_a_4bit_base_outputs_and_gradients_match_peft_s_4bit_randlora(tiny_model_dir, bnb_cpu_path):
    """Both wrap the same NF4 Linear4bit weights (quantised alike from the same file), compute in float32."""
    model_config = ModelConfig(name_or_path=str(tiny_model_dir))
    ours = load_model(model_config, NF4["float32"], torch.device("cpu"))
    adapter = randlora(ours, seed=3)
    peft_model = peft_randlora(load_model(model_config, NF4["float32"], torch.device("cpu")), seed=3)
    pairs = copy_scalings(adapter, peft_model)
    find_shared_inputs(ours, torch.device("cpu"))
    assert_matches_peft(ours, peft_model, pairs)


def test_bases_are_frozen_regenerated_and_never_saved(tiny_model, tiny_model_dir, tmp_path):
    adapter = randlora(tiny_model, seed=11)
    randomize_factors(adapter, scale=0.5)
    assert not any(adapter.shared[name].requires_grad for name in ("randlora_A", "randlora_B"))
    save_adapter(adapter, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / WEIGHTS_FILE)
    assert not {"randlora_A", "randlora_B"} & set(saved) and len(saved) == 2 * len(adapter.layers())
    record = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["regenerated"]
    assert set(record) == {"randlora_A", "randlora_B"} and "manual_seed(11)" in record["randlora_B"]["rule"]
    fresh = load_tiny_llama(tiny_model_dir)
    load_adapter(fresh, tmp_path / "adapter")
    tokens = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, tiny_model(tokens).logits)


def train_4bit_and_merge(tmp_path: Path, model_dir: Path, method: str, lr: float) -> int:
    """`sharelora train` (8 steps) on an NF4 base: validation loss falls, and the merged checkpoint (the dequantised
    base plus ΔW, written in float32) gives the 4-bit adapted model's logits, up to float32 reordering (module
    docstring). Returns the run's trainable parameters."""
    adapter = {"method": method, "targets": LLAMA_TARGETS}
    train_section = {"max_steps": 8, "lr": lr, "eval_every": 4, "checkpoint_every": 100}
    quantization = NF4["float32"].model_dump()
    recipe = load_recipe(
        str(write_recipe(tmp_path, model_dir, adapter=adapter, quantization=quantization, train=train_section)), []
    )
    summary = train(recipe)
    val = [m["val_loss"] for m in read_metrics(Path(recipe.output_dir)) if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]
    adapter_dir = Path(recipe.output_dir) / "adapter"
    quantized = load_model(ModelConfig(name_or_path=str(model_dir)), NF4["float32"], torch.device("cpu"))
    load_adapter(quantized, adapter_dir)
    merge_adapter(adapter_dir, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(tokens).logits, quantized.eval()(tokens).logits, atol=TOLERANCE, rtol=TOLERANCE
        )
    return summary.trainable_parameters


def test_trains_on_a_4bit_base_and_merges_into_it(tmp_path, tiny_model_dir):
    trainable = train_4bit_and_merge(tmp_path, tiny_model_dir, "randlora", lr=1e-2)
    # r = 8, n·(r + min(d_in, d_out)) per module: q o (128→128), gate up (128→320) and down (320→128) have 16 bases
    # on a smaller side of 128, k v (128→64) 8 bases on 64.
    per_layer = 5 * 16 * (8 + 128) + 2 * 8 * (8 + 64)
    assert trainable == 4 * per_layer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_loads_in_peft_with_the_adapted_logits(arch, tiny_model_dir, gpt2_dir, tmp_path, monkeypatch, capsys):
    """With rsLoRA too: PEFT scales by randlora_alpha / r, so the export writes α·√r for our α/√r."""
    base_dir, targets = (tiny_model_dir, LLAMA_TARGETS) if arch == "llama" else (gpt2_dir, GPT2_TARGETS)
    settings = {"projection_seed": 3}
    config = adapter_config("randlora", rank=8, alpha=4.0, rslora=True, targets=targets, randlora=settings)
    adapter_dir, ids, before, adapted = make_adapter(base_dir, tmp_path / "adapter", config)
    peft_config = export(monkeypatch, capsys, adapter_dir, tmp_path / "peft")
    assert (peft_config["peft_type"], peft_config["r"], peft_config["projection_prng_key"]) == ("RANDLORA", 8, 3)
    assert peft_config["randlora_alpha"] == pytest.approx(4.0 * 8**0.5, rel=1e-15)
    modules = [p for g in read_adapter_config(adapter_dir)["plan"].values() for p in g["modules"]]
    assert set(exported_tensors(tmp_path / "peft")) == {"base_model.randlora_A", "base_model.randlora_B"} | {
        f"base_model.model.{path}.randlora_{name}" for path in modules for name in ("lambda", "gamma")
    }
    assert (adapted - before).abs().max() > 0.01
    exported = peft_logits(base_dir, tmp_path / "peft", ids)
    torch.testing.assert_close(exported, adapted, atol=TOLERANCE, rtol=TOLERANCE)
