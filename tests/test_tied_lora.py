"""Tied-LoRA: A, B tied per module type, u, v per layer, and any subset of them trained (the paper's variants)."""

import copy
import itertools

import pytest
import torch
from reference import adapter_config, randomize_factors
from safetensors.torch import load_file
from test_adapters import assert_layers_follow_formula, assert_model_equals_merged_reference
from tiny_architectures import LLAMA_TARGETS, load_tiny_llama

from sharelora_cli.adapters.adapter_io import WEIGHTS_FILE, load_adapter, save_adapter
from sharelora_cli.adapters.inject import inject_adapter, planned_trainable
from sharelora_cli.config.recipe import TrainConfig, validate
from sharelora_cli.core.errors import UserError
from sharelora_cli.training.loop import make_optimizer

NAMES = "ABuv"
VARIANTS = [list(v) for n in range(1, 5) for v in itertools.combinations(NAMES, n)]  # all 15 non-empty subsets
TARGETS = ["q_proj", "v_proj", "down_proj"]  # (d_in, d_out): (128, 128), (128, 64), (320, 128); L = 4
TOKENS = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(5))


def tied(model, train: list[str], targets=TARGETS, **fields):
    return inject_adapter(
        model, adapter_config("tied-lora", rank=8, targets=targets, tied_lora={"train": train}, **fields)
    )


def variant_count(train: list[str], rank: int = 8, layers: int = 4) -> int:
    """Per module type: A r·d_in and B d_out·r once (tied), u r and v d_out per layer; only trained ones count."""
    total = 0
    for d_in, d_out in [(128, 128), (128, 64), (320, 128)]:
        total += ("A" in train) * rank * d_in + ("B" in train) * d_out * rank
        total += layers * (("u" in train) * rank + ("v" in train) * d_out)
    return total


def test_variant_counts_by_hand():
    """r = 8, L = 4, types (d_in, d_out) = (128, 128), (128, 64), (320, 128).

    A: 8·(128 + 128 + 320) = 4,608; B: 8·(128 + 64 + 128) = 2,560; u: 4·3·8 = 96; v: 4·(128 + 64 + 128) = 1,280.
    """
    assert variant_count(["A"]) == 4608 and variant_count(["B"]) == 2560
    assert variant_count(["u"]) == 96 and variant_count(["v"]) == 1280
    assert variant_count(list(NAMES)) == 4608 + 2560 + 96 + 1280 == 8544


@pytest.mark.parametrize("train", VARIANTS, ids="".join)
def test_each_variant_trains_exactly_its_factors(tiny_model, train):
    config = adapter_config("tied-lora", rank=8, targets=TARGETS, tied_lora={"train": train})
    planned = planned_trainable(tiny_model, config)
    adapter = inject_adapter(tiny_model, config)
    in_model = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    assert adapter.num_trainable() == planned == in_model == variant_count(train)
    optimizer = make_optimizer(adapter, TrainConfig(), torch.device("cpu"))
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in adapter.parameters()}
    with torch.no_grad():  # ΔW = 0 before training, whichever factors train
        for layer in adapter.layers():
            assert torch.equal(layer.delta_weight(), torch.zeros(layer.d_out, layer.d_in))
    tiny_model(TOKENS, labels=TOKENS).loss.backward()
    for group in adapter.groups.values():
        for name in NAMES:
            tensors = group.tensors[f"tied_{name}"]
            assert len(tensors) == (1 if name in "AB" else 4)
            assert all(t.requires_grad == (name in train) for t in tensors)
            if name not in train:
                assert all(t.grad is None for t in tensors)
    # The zero-initialised factor (v if it trains, else B, else u, else A) gets a gradient at the first step.
    zeroed = next(name for name in "vBuA" if name in train)
    assert all(t.grad.abs().sum() > 0 for g in adapter.groups.values() for t in g.tensors[f"tied_{zeroed}"])


@pytest.mark.parametrize("train", [["u", "v"], ["A", "v"], list(NAMES)], ids="".join)
def test_forward_is_base_plus_scaled_vbua(tiny_model, train):
    base = copy.deepcopy(tiny_model)
    adapter = tied(tiny_model, train, targets=LLAMA_TARGETS, alpha=12)
    randomize_factors(adapter, seed=4)
    assert_layers_follow_formula(adapter)
    assert_model_equals_merged_reference(adapter, base, tiny_model.config.vocab_size)


def test_training_only_a_and_b_is_sharelora_shareab(tiny_model, tiny_model_dir):
    twin = load_tiny_llama(tiny_model_dir)
    torch.manual_seed(0)
    tied_ab = tied(tiny_model, ["A", "B"])
    torch.manual_seed(0)
    shareab = inject_adapter(twin, adapter_config("shareab", rank=8, targets=TARGETS))
    assert tied_ab.num_trainable() == shareab.num_trainable()
    for name, group in tied_ab.groups.items():
        assert torch.equal(group.tensors["tied_A"][0], shareab.groups[name].tensors["lora_A"][0])
        assert all(torch.equal(u, torch.ones(8)) for u in group.tensors["tied_u"])
    randomize_factors(tied_ab, seed=2)
    randomize_factors(shareab, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(TOKENS).logits, twin(TOKENS).logits, atol=1e-6, rtol=1e-6)


def test_frozen_tied_factors_are_saved_and_reloaded(tiny_model, tiny_model_dir, tmp_path):
    adapter = tied(tiny_model, ["u", "v"])
    randomize_factors(adapter, seed=6, scale=0.5)
    save_adapter(adapter, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / WEIGHTS_FILE)
    assert {"q_proj.tied_A.0", "q_proj.tied_B.0"} <= set(saved)
    fresh = load_tiny_llama(tiny_model_dir)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.num_trainable() == variant_count(["u", "v"])
    for name, tensor in adapter.named_tensors().items():
        assert torch.equal(loaded.named_tensors()[name], tensor)
        assert loaded.named_tensors()[name].requires_grad == tensor.requires_grad
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, tiny_model(TOKENS).logits)


@pytest.mark.parametrize(
    ("train", "needle"), [([], "at least 1"), (["A", "A"], "lists a factor twice"), (["C"], "A, B, u or v")]
)
def test_bad_train_lists_are_one_line_errors(train, needle):
    with pytest.raises(UserError, match=r"adapter\.tied_lora\.train") as raised:
        validate({"adapter": {"method": "tied-lora", "tied_lora": {"train": train}}})
    assert needle in str(raised.value) and "\n" not in str(raised.value)
