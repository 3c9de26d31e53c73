"""UniLoRA: one trainable vector for the model, every LoRA entry a fixed scaled entry of it; PEFT's assignment.

Parity tolerances are test_lily's (derived there): DEPTH·γ_n of the compared tensor's largest entry, in its dtype.
"""

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from peft import PeftModel, UniLoraConfig, get_peft_model
from safetensors.torch import load_file
from test_lily import TOKENS, assert_close_relative, assert_same_as_peft, layer_path
from test_merge import GPT2_TARGETS, gpt2_dir
from test_train import read_metrics, train_and_resume, write_recipe
from tiny_architectures import LLAMA_TARGETS, load_tiny_llama
from transformers import AutoModelForCausalLM

from sharelora_cli.adapters.adapter_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter, planned_trainable
from sharelora_cli.config.recipe import AdapterConfig, ModelConfig, QuantizationConfig, validate
from sharelora_cli.core.errors import UserError
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.quantization import dequantized_weight
from sharelora_cli.outputs.export import export_adapter
from sharelora_cli.outputs.merge import merge_adapter

__all__ = ["gpt2_dir"]  # a fixture shared with test_merge


def unilora_config(rank: int = 4, length: int = 1000, seed: int = 7) -> AdapterConfig:
    settings = {"vector_length": length, "projection_seed": seed}
    return AdapterConfig(method="unilora", rank=rank, targets=LLAMA_TARGETS, unilora=settings)


def peft_unilora(model, rank: int = 4, length: int = 1000, seed: int = 7):
    config = UniLoraConfig(r=rank, theta_d_length=length, proj_seed=seed, target_modules=LLAMA_TARGETS)
    return get_peft_model(model, config)


def spread_theta(adapter, peft_model) -> torch.Tensor:
    """θ large enough to move the logits (PEFT's U(±0.02) barely does), the same in both models."""
    theta = adapter.shared["unilora_theta_d"]
    theirs = peft_model.base_model.unilora_theta_d["default"]
    with torch.no_grad():
        theta.copy_(torch.randn(theta.shape, generator=torch.Generator().manual_seed(5), dtype=theta.dtype) * 2)
        theirs.copy_(theta)
    return theirs


def test_the_assignment_and_scales_are_peft_s_for_the_same_seed(tiny_model, tiny_model_dir):
    """Tiny Llama, r 4, all seven projections: D = 4 layers · r · Σ(d_in + d_out) = 16 · 2240 = 35,840 entries
    over 1000 indices, so every index is used 35 or 36 times (840 of them 36) and scaled 1/√35 or 1/√36."""
    adapter = inject_adapter(tiny_model, unilora_config())
    peft_model = peft_unilora(load_tiny_llama(tiny_model_dir))
    indices = []
    for layer in adapter.layers():
        theirs = peft_model.base_model.model.get_submodule(layer_path(tiny_model, layer))
        for side in "AB":
            index = layer.indices(side)
            assert torch.equal(index, getattr(theirs, f"unilora_indices_{side}")["default"])
            assert torch.equal(layer.inverse_sqrt_uses[index], getattr(theirs, f"unilora_scales_{side}")["default"])
            indices.append(index.flatten())
    counts = torch.bincount(torch.cat(indices), minlength=1000)
    assert counts.sum() == 35_840 and (counts == 36).sum() == 840 and (counts == 35).sum() == 160
    layer = adapter.layers()[0]
    lora_A, lora_B, scaling = layer.low_rank()
    theta = adapter.shared["unilora_theta_d"].detach()
    assert scaling == 1.0 and lora_A.shape == (4, 128) and lora_B.shape == (128, 4)
    # A[i, j] = θ[index] / √(uses of that index): a product and a reciprocal square root, 2 roundings apart.
    for factor, index in ((lora_A, layer.indices("A")), (lora_B, layer.indices("B"))):
        expected = theta[index] / counts[index].double().sqrt().float()
        torch.testing.assert_close(factor.detach(), expected, atol=0, rtol=2 * torch.finfo(torch.float32).eps)


def test_a_different_seed_assigns_differently(tiny_model, tiny_model_dir):
    first = inject_adapter(tiny_model, unilora_config(seed=1)).layers()[0]
    second = inject_adapter(load_tiny_llama(tiny_model_dir), unilora_config(seed=2)).layers()[0]
    assert not torch.equal(first.indices("A"), second.indices("A"))


def test_the_assignment_is_regenerated_not_saved_and_a_different_one_is_refused(tiny_model, tiny_model_dir, tmp_path):
    save_adapter(inject_adapter(tiny_model, unilora_config()), tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / WEIGHTS_FILE)) == {"unilora_theta_d"}
    path = tmp_path / "adapter" / CONFIG_FILE
    config = json.loads(path.read_text())
    record = config["regenerated"]["unilora_assignment"]
    assert record["shape"] == [35_840] and "default_rng(7)" in record["rule"]
    load_adapter(load_tiny_llama(tiny_model_dir), tmp_path / "adapter")  # regenerates the recorded assignment
    record["sha256"] = "0" * 64  # what another numpy, drawing another stream from the seed, would look like
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="regenerated tensor unilora_assignment differs"):
        load_adapter(load_tiny_llama(tiny_model_dir), tmp_path / "adapter")


def test_count_is_the_vector_length_as_in_peft(tiny_model, tiny_model_dir):
    config = unilora_config()
    trainable, _ = peft_unilora(load_tiny_llama(tiny_model_dir)).get_nb_trainable_parameters()
    ours = inject_adapter(tiny_model, config).num_trainable()
    assert ours == planned_trainable(load_tiny_llama(tiny_model_dir), config) == trainable == 1000


def test_inspect_counts_unilora_on_llama_7b():
    """LLaMA-7B, r 64, all seven projections: one vector of PEFT's default length, 256 trainable parameters,
    indexing D = 32 · 64 · 78,080 = 159,907,840 entries (LoRA's count; see test_inspect), each index ~624,640 times."""
    result = run_cli("inspect", "--model", "llama-7b", "--rank", "64", "--targets", ",".join(LLAMA_TARGETS), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["unilora"] == 256


def test_outputs_and_the_vector_s_gradient_equal_peft_s_in_float64(tiny_model, tiny_model_dir):
    base = load_tiny_llama(tiny_model_dir).double()
    adapter = inject_adapter(tiny_model, unilora_config())
    tiny_model.double()
    peft_model = peft_unilora(load_tiny_llama(tiny_model_dir).double())
    theirs = spread_theta(adapter, peft_model)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    with torch.no_grad():
        assert (tiny_model(TOKENS).logits - base(TOKENS).logits).abs().max() > 1e-3
    assert_same_as_peft(tiny_model, peft_model, [(adapter.shared["unilora_theta_d"], theirs)])
    # The fused path ran: q/k/v (3) and gate/up (2) computed together, o and down alone.
    assert sorted({len(layer.group.members) for layer in adapter.layers()}) == [1, 2, 3]


def test_on_a_4bit_base_equals_peft_on_the_dequantised_weights(tiny_model_dir):
    quant = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), quant, torch.device("cpu"))
    adapter = inject_adapter(model, unilora_config())
    dense = load_tiny_llama(tiny_model_dir)
    with torch.no_grad():
        for layer in adapter.layers():
            dense.get_submodule(layer_path(model, layer)).weight.copy_(dequantized_weight(layer.base_layer))
    peft_model = peft_unilora(dense)
    theirs = spread_theta(adapter, peft_model)
    model.train()  # bitsandbytes' CPU path dequantises in training mode (tests/test_qlora_cpu.py)
    assert_same_as_peft(model, peft_model, [(adapter.shared["unilora_theta_d"], theirs)])


@pytest.fixture(scope="module", params=["full-precision", "4-bit"])
def runs(request, tmp_path_factory, tiny_model_dir) -> dict:
    """The quickstart's shape with adapter.method=unilora: 8 steps, and the same run resumed from checkpoint-5."""
    tmp = tmp_path_factory.mktemp(f"unilora-{request.param}")
    sections = {"quantization": {"load_in_4bit": True, "compute_dtype": "float32"}} if request.param == "4-bit" else {}
    recipe = write_recipe(
        tmp,
        tiny_model_dir,
        adapter={"method": "unilora", "rank": 8, "targets": LLAMA_TARGETS, "dropout": 0.1},
        # A vector of 256 trains like VeRA's vectors: a larger learning rate than LoRA's factors.
        train={"max_steps": 8, "lr": 3e-2, "eval_every": 4, "checkpoint_every": 5},
        **sections,
    )
    return train_and_resume(recipe, tmp)


def test_training_lowers_the_validation_loss(runs):
    val = [m["val_loss"] for m in read_metrics(runs["full"]) if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]


def test_a_resumed_run_ends_with_the_uninterrupted_vector(runs):
    full = load_file(runs["full"] / "adapter" / "adapter.safetensors")
    resumed = load_file(runs["resumed"] / "adapter" / "adapter.safetensors")
    assert set(full) == {"unilora_theta_d"} and runs["trainable"] == 256
    assert torch.equal(resumed["unilora_theta_d"], full["unilora_theta_d"])


def adapted_logits(base_dir, adapter_dir, ids, quantization: QuantizationConfig | None = None) -> torch.Tensor:
    model = load_model(
        ModelConfig(name_or_path=str(base_dir)), quantization or QuantizationConfig(), torch.device("cpu")
    )
    load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(ids).logits


def test_the_trained_adapter_merges_to_the_adapted_logits(runs, tiny_model_dir, tmp_path):
    """On the 4-bit run, merge folds ΔW into the dequantised base: equal to the adapter on the 4-bit base."""
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    adapter_dir = runs["full"] / "adapter"
    quant = json.loads((adapter_dir / "sharelora_config.json").read_text()).get("quantization")
    expected = adapted_logits(tiny_model_dir, adapter_dir, ids, QuantizationConfig(**quant) if quant else None)
    merge_adapter(adapter_dir, tmp_path / "merged")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert (expected - base).abs().max() > 1e-3
    assert_close_relative(merged, expected)


@pytest.mark.parametrize("runs", ["full-precision"], indirect=True)
def test_the_trained_adapter_exports_to_peft_s_unilora_with_the_same_logits(runs, tiny_model_dir, tmp_path):
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = adapted_logits(tiny_model_dir, runs["full"] / "adapter", ids)
    export_adapter(runs["full"] / "adapter", Path(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["theta_d_length"], config["proj_seed"]) == ("UNILORA", 256, 42)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    with torch.no_grad():
        assert_close_relative(peft_model.eval()(input_ids=ids).logits, expected)


def test_gpt2_conv1d_layers_export_to_peft_with_the_same_logits(gpt2_dir, tmp_path):
    """GPT-2 stores its projections transposed (Conv1D): PEFT's UniLoRA assigns by (in, out) as sharelora does."""
    config = AdapterConfig(method="unilora", rank=4, targets=GPT2_TARGETS, unilora={"vector_length": 100})
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    adapter = inject_adapter(model, config)
    with torch.no_grad():
        adapter.shared["unilora_theta_d"].normal_(0, 2, generator=torch.Generator().manual_seed(3))
    save_adapter(adapter, tmp_path / "adapter", base_model=str(gpt2_dir))
    export_adapter(tmp_path / "adapter", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), tmp_path / "peft")
    with torch.no_grad():
        expected = model(ids).logits
        assert (expected - AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()(ids).logits).abs().max() > 1e-3
        assert_close_relative(peft_model.eval()(input_ids=ids).logits, expected)


def test_a_vector_longer_than_float32_counts_exactly_is_a_one_line_recipe_error():
    """The regenerated assignment holds indices as float32, exact up to 2^24."""
    with pytest.raises(UserError, match=r"adapter\.unilora\.vector_length: .*16777216"):
        validate({"adapter": {"method": "unilora", "unilora": {"vector_length": 2**24 + 1}}})
