"""Each method's forward is W x + ΔW x with ΔW from the methods.md formula; merge folds exactly that ΔW."""

import copy

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within, reordering_bound
from reference import METHODS, adapter_config, expected_delta, miss_delta, randomize_factors
from tiny_architectures import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2

from sharelora_cli.adapters.base import is_conv1d
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig


def adapt(model, method: str, targets: list[str], **options):
    """Inject an adapter with random non-zero factors; returns (adapter, untouched copy of the base)."""
    base = copy.deepcopy(model)
    adapter = inject_adapter(model, adapter_config(method, targets=targets, **options))
    randomize_factors(adapter)
    return adapter, base


def fold_reference_deltas(adapter, base) -> None:
    """Add each module's reference ΔW into the plain base model: the merged model by hand."""
    with torch.no_grad():
        for group in adapter.groups.values():
            for position, path in enumerate(group.modules):
                weight = base.get_submodule(path).weight
                delta = expected_delta(adapter, group, position)
                weight.add_(delta.t() if is_conv1d(base.get_submodule(path)) else delta)


def delta_bound(layer) -> torch.Tensor:
    """|ΔW − the reference ΔW|, entrywise: both sum r products B_ik·A_kj (in other orders; r is A's row count,
    n·r for RandLoRA), after forming A and B in up to 6 rounding steps each (VB-LoRA's softmax-weighted top-2
    mixture: exp, sum, divide, two products, one add; VeRA and Tied-LoRA one scaling product, RandLoRA two)
    and one more for s: r + 13 steps on terms |s|·|B_ik|·|A_kj|."""
    lora_A, lora_B, scaling = (t.detach() if isinstance(t, torch.Tensor) else t for t in layer.low_rank())
    if hasattr(layer, "tinylora_P"):  # TinyLoRA's A = (Σ_l v_l P_l) A_svd is itself a sum of u·r products per entry
        v, P, A = layer.tinylora_v[layer.tie_group].detach(), layer.tinylora_P, layer.tinylora_A
        magnitude = lora_B.abs() @ torch.einsum("l,ljk->jk", v.abs(), P.abs()) @ A.abs()
        return reordering_bound(v.shape[0] + 2 * A.shape[0] + 13, magnitude)
    return reordering_bound(lora_A.shape[0] + 13, abs(scaling) * (lora_B.abs() @ lora_A.abs()))


def forward_bound(layer, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|layer(x) − (W x + ΔW_ref x)|: the base product (d_in terms, maybe fused with the adapter's), s·B(A x) against
    x·ΔWᵀ (the same d_in·r products |x_j|·|A_kj|·|B_ik| summed in other orders, after ΔW's own error) and the sum."""
    lora_A, lora_B, scaling = (t.detach() if isinstance(t, torch.Tensor) else t for t in layer.low_rank())
    weight = layer.base_layer.weight.detach().abs()
    base = reordering_bound(layer.d_in, x.abs() @ (weight if is_conv1d(layer.base_layer) else weight.t()))
    products = abs(scaling) * ((x.abs() @ lora_A.abs().t()) @ lora_B.abs().t())
    adapter = reordering_bound(layer.d_in + lora_A.shape[0] + 13, products) + x.abs() @ delta_bound(layer).t()
    total = layer.base_layer(x).abs() + (x @ delta.t()).abs()
    return base + adapter + reordering_bound(1, total)


def assert_layers_follow_formula(adapter) -> None:
    generator = torch.Generator().manual_seed(1)
    for group in adapter.groups.values():
        for position, path in enumerate(group.modules):
            layer = adapter.model.get_submodule(path)
            delta = expected_delta(adapter, group, position)
            x = torch.randn(2, 5, group.d_in, generator=generator)
            with torch.no_grad():
                assert_within(layer(x), layer.base_layer(x) + x @ delta.t(), forward_bound(layer, x, delta))
                assert_within(layer.delta_weight(), delta, delta_bound(layer))


def assert_model_equals_merged_reference(adapter, base, vocab_size: int) -> None:
    fold_reference_deltas(adapter, base)
    tokens = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(tokens).logits, base(tokens).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_linear_forward_is_base_plus_formula_delta(tiny_model, method):
    adapter, base = adapt(tiny_model, method, LLAMA_TARGETS, rank=8, alpha=16)
    assert_layers_follow_formula(adapter)
    assert_model_equals_merged_reference(adapter, base, tiny_model.config.vocab_size)


@pytest.mark.parametrize("method", METHODS)
def test_conv1d_forward_is_base_plus_formula_delta(method):
    model = tiny_gpt2()
    adapter, base = adapt(model, method, GPT2_TARGETS, rank=4, alpha=8)
    assert all(is_conv1d(layer.base_layer) for layer in adapter.layers())
    # attn.c_proj (64→64) and mlp.c_proj (256→64) share a name but not a shape: separate groups.
    assert sorted(adapter.groups) == ["c_attn", "c_fc", "c_proj.64x256", "c_proj.64x64"]
    assert_layers_follow_formula(adapter)
    assert_model_equals_merged_reference(adapter, base, model.config.vocab_size)


def test_miss_pads_input_when_rank_does_not_divide_d_in(tiny_model):
    rank = 12
    adapter, base = adapt(tiny_model, "miss", ["q_proj", "down_proj"], rank=rank)
    assert {group.d_in % rank for group in adapter.groups.values()} == {128 % 12, 320 % 12} == {8}
    assert_layers_follow_formula(adapter)
    assert_model_equals_merged_reference(adapter, base, tiny_model.config.vocab_size)


def test_miss_delta_weight_repeats_shard_along_input():
    shard = torch.arange(6.0).reshape(3, 2)  # r=3, d_out=2
    expected = torch.tensor([[0.0, 2.0, 4.0, 0.0, 2.0, 4.0, 0.0], [1.0, 3.0, 5.0, 1.0, 3.0, 5.0, 1.0]])
    assert torch.equal(miss_delta(shard, 7), expected)
    layer = torch.nn.Linear(7, 2)
    adapter = inject_adapter(torch.nn.Sequential(layer), AdapterConfig(method="miss", rank=3, targets=["0"]))
    with torch.no_grad():
        adapter.parameters()[0].copy_(shard)
    assert torch.equal(adapter.layers()[0].delta_weight(), expected)


def test_rslora_scales_by_alpha_over_sqrt_rank(tiny_model):
    adapter, base = adapt(tiny_model, "lora", ["q_proj", "v_proj"], rank=16, alpha=8, rslora=True)
    assert all(layer.scaling == 8 / 4 for layer in adapter.layers())
    assert_layers_follow_formula(adapter)
    assert_model_equals_merged_reference(adapter, base, tiny_model.config.vocab_size)


@pytest.mark.parametrize("method", ["lora", "miss"])
def test_dropout_masks_adapter_input_only_in_train_mode(tiny_model, method):
    p = 0.3
    adapter, _ = adapt(tiny_model, method, ["up_proj"], rank=8, dropout=p)
    group = adapter.groups["up_proj"]
    layer = adapter.model.get_submodule(group.modules[0])
    delta = expected_delta(adapter, group, 0)
    x = torch.randn(4, 6, group.d_in)
    with torch.no_grad():
        layer.train()
        torch.manual_seed(7)
        train_out = layer(x)
        torch.manual_seed(7)
        dropped = F.dropout(x, p, training=True)
        layer.eval()
        eval_out = layer(x)
    assert (dropped == 0).float().mean().item() == pytest.approx(p, abs=0.05)
    # Dropout feeds only the adapter branch: the base still sees the whole input.
    torch.testing.assert_close(train_out, layer.base_layer(x) + dropped @ delta.t(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(eval_out, layer.base_layer(x) + x @ delta.t(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(train_out, eval_out, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_merge_matches_unmerged_forward_and_unmerge_restores_weight(tiny_model, method, arch):
    model, targets = (tiny_model, ["gate_proj", "down_proj"]) if arch == "llama" else (tiny_gpt2(), ["c_attn", "c_fc"])
    adapter, _ = adapt(model, method, targets, rank=8)
    for group in adapter.groups.values():
        for position, path in enumerate(group.modules):
            layer = adapter.model.get_submodule(path)
            weight = layer.base_layer.weight
            original = weight.detach().clone()
            x = torch.randn(3, group.d_in)
            with torch.no_grad():
                unmerged = layer(x)
                layer.merge()
                merged = layer(x)
            delta = expected_delta(adapter, group, position)
            torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(weight - original, delta.t() if arch == "gpt2" else delta, atol=1e-6, rtol=1e-5)
            layer.unmerge()
            torch.testing.assert_close(weight, original, atol=1e-6, rtol=0)
            assert not layer.merged


def test_merging_twice_does_not_add_delta_twice(tiny_model):
    adapter, _ = adapt(tiny_model, "lora", ["q_proj"], rank=8)
    layer = adapter.layers()[0]
    x = torch.randn(3, layer.d_in)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        layer.unmerge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
