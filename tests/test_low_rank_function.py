"""LowRankFunction's hand-written backward is the true gradient, and adapted layers fuse the base only when that is safe."""

import pytest
import torch
import torch.nn.functional as F
from reference import adapter_config, expected_delta, randomize_factors
from tiny_architectures import LLAMA_TARGETS
from torch import nn
from transformers.pytorch_utils import Conv1D

from sharelora_cli.adapters.base import Hyper, layer_shape, plain_frozen_weight
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.adapters.miss import MissLayer, chunk_sum_matrix
from sharelora_cli.adapters.low_rank_function import LowRankFunction
from sharelora_cli.inject import inject_adapter
from sharelora_cli.recipe import AdapterConfig

D_IN, D_OUT, RANK = 6, 5, 3


def double(*shape, grad=True, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_base_and_delta_gradients_match_finite_differences(with_bias):
    x, A, B = double(2, 4, D_IN, seed=1), double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3)
    weight = double(D_OUT, D_IN, grad=False, seed=4)
    bias = double(D_OUT, grad=False, seed=5) if with_bias else None
    assert torch.autograd.gradcheck(lambda x, A, B: LowRankFunction.apply(x, A, B, 0.7, x, weight, bias), (x, A, B))


def test_separate_adapter_input_gets_its_own_gradient():
    # Dropout gives the adapter a different tensor than the base: each must get only its own term.
    x, x_a = double(3, D_IN, seed=1), double(3, D_IN, seed=6)
    A, B, weight = double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3), double(D_OUT, D_IN, grad=False, seed=4)
    assert torch.autograd.gradcheck(lambda x, x_a, A, B: LowRankFunction.apply(x_a, A, B, 2.0, x, weight, None),
                                    (x, x_a, A, B))


def test_delta_only_gradients_match_finite_differences():
    x, A, B = double(2, 3, D_IN, seed=1), double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3)
    assert torch.autograd.gradcheck(lambda x, A, B: LowRankFunction.apply(x, A, B, 1.5, None, None, None), (x, A, B))


def test_input_without_grad_still_trains_the_factors():
    x, A, B = double(4, D_IN, grad=False, seed=1), double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3)
    weight = double(D_OUT, D_IN, grad=False, seed=4)
    LowRankFunction.apply(x, A, B, 0.5, x, weight, None).square().sum().backward()
    A_ref, B_ref = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    (x @ weight.t() + 0.5 * (x @ A_ref.t()) @ B_ref.t()).square().sum().backward()
    torch.testing.assert_close(A.grad, A_ref.grad)
    torch.testing.assert_close(B.grad, B_ref.grad)


def lora_layer(base: nn.Module) -> LoraLayer:
    d_in, d_out = layer_shape(base)
    factors = {"lora_A": nn.Parameter(torch.randn(RANK, d_in)), "lora_B": nn.Parameter(torch.randn(d_out, RANK))}
    return LoraLayer(base.requires_grad_(False), factors, Hyper(rank=RANK, alpha=2.0, dropout=0.0, rslora=False))


def reference_output(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The unfused formula, differentiated by autograd."""
    return layer.base_layer(x) + layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B)


@pytest.mark.parametrize("base", [nn.Linear(D_IN, D_OUT), Conv1D(D_OUT, D_IN)], ids=["linear", "conv1d"])
def test_layer_output_and_gradients_equal_the_unfused_formula(base):
    torch.manual_seed(0)
    layer = lora_layer(base)
    assert plain_frozen_weight(layer.base_layer) is not None  # the fused path is the one under test
    x = torch.randn(2, 7, D_IN, requires_grad=True)
    grads = []
    for forward in (layer, lambda x: reference_output(layer, x)):
        out = forward(x)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad))
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    for fused, reference in zip(*grads):
        torch.testing.assert_close(fused, reference)


def test_hooked_or_trainable_bases_are_not_fused_and_their_hooks_run():
    linear = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    assert plain_frozen_weight(linear) is not None
    calls = []
    linear.register_forward_hook(lambda *_: calls.append(1))
    assert plain_frozen_weight(linear) is None
    layer = lora_layer(linear)
    torch.testing.assert_close(layer(torch.ones(1, D_IN)), reference_output(layer, torch.ones(1, D_IN)))
    assert len(calls) == 2
    assert plain_frozen_weight(nn.Linear(D_IN, D_OUT)) is None  # a trainable weight needs autograd's backward


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base-fused"])
def test_autocast_runs_the_adapter_in_bf16_and_keeps_float32_gradients(base_dtype):
    torch.manual_seed(0)
    layer = lora_layer(nn.Linear(D_IN, D_OUT).to(base_dtype))
    x = torch.randn(3, D_IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        reference = reference_output(layer, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.02)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    expected_B_grad = layer.scaling * (x @ layer.lora_A.detach().t()).sum(0).expand(D_OUT, RANK)
    torch.testing.assert_close(layer.lora_B.grad, expected_B_grad, atol=0.1, rtol=0.02)


def test_miss_gradient_is_that_of_the_padded_chunk_sum():
    # d_in = 7 is not a multiple of rank 3: the last chunk is zero-padded in the methods.md formula.
    torch.manual_seed(0)
    base = nn.Linear(7, D_OUT).requires_grad_(False)
    layer = MissLayer(base, {"miss_D": nn.Parameter(torch.randn(RANK, D_OUT))}, Hyper(RANK, 1.0, 0.0, False))
    x = torch.randn(2, 4, 7, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    fused = (out.detach(), x.grad, layer.miss_D.grad)
    x.grad = layer.miss_D.grad = None
    chunk_sum = F.pad(x, (0, 2)).reshape(2, 4, 3, RANK).sum(dim=-2)
    reference = base(x) + chunk_sum @ layer.miss_D
    reference.backward(torch.ones_like(reference))
    for got, expected in zip(fused, (reference.detach(), x.grad, layer.miss_D.grad)):
        torch.testing.assert_close(got, expected)


def test_chunk_sum_matrix_first_built_in_inference_mode_can_still_be_trained_through():
    with torch.inference_mode():
        chunk_sum_matrix(11, 4, torch.device("cpu"), torch.float32)
    layer = MissLayer(nn.Linear(11, 2).requires_grad_(False), {"miss_D": nn.Parameter(torch.ones(4, 2))},
                      Hyper(4, 1.0, 0.0, False))
    layer(torch.ones(1, 11)).sum().backward()
    # Chunks of 11 ones at rank 4: columns 0-2 appear three times, column 3 twice.
    torch.testing.assert_close(layer.miss_D.grad, torch.tensor([[3.0, 3.0], [3.0, 3.0], [3.0, 3.0], [2.0, 2.0]]))


@pytest.mark.parametrize("method", ["sharea", "miss"])
def test_gradient_checkpointing_recomputes_to_the_same_factor_gradients(tiny_model, method):
    adapter = inject_adapter(tiny_model, AdapterConfig(method=method, rank=4, targets=LLAMA_TARGETS))
    randomize_factors(adapter)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tiny_model.train()
        tiny_model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append([p.grad.clone() for p in adapter.parameters()])
        adapter.model.zero_grad(set_to_none=True)
    for plain, recomputed in zip(*grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(recomputed, plain)


@pytest.mark.parametrize("method", ["vera", "tied-lora", "vblora"])
def test_vectors_and_bank_folded_into_the_fused_factors_give_the_plain_formula_s_gradients(method):
    """VeRA and Tied-LoRA fold their vectors into A and B, VB-LoRA builds them from the bank: the fused kernel's
    output and gradients (input, every trainable tensor) equal autograd through the plain formula, x (W + ΔW)ᵀ + b.

    In float64, so that the two orders of summation agree far below any difference a wrong gradient would make.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 96))  # two shapes: VeRA cuts its pair for each
    adapter = inject_adapter(model, adapter_config(method, rank=4, targets=["0", "1"]))
    randomize_factors(adapter, seed=1, scale=0.3)
    model.double()
    assert all(plain_frozen_weight(layer.base_layer) is not None for layer in adapter.layers())
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    results = []
    for plain in (False, True):
        h = x
        for group in adapter.groups.values():
            layer = model.get_submodule(group.modules[0])
            if plain:
                h = F.linear(h, layer.base_layer.weight + expected_delta(adapter, group, 0), layer.base_layer.bias)
            else:
                h = layer(h)
        h.square().sum().backward()
        results.append([h.detach(), x.grad] + [p.grad for p in adapter.parameters()])
        x.grad = None
        for p in adapter.parameters():
            p.grad = None
    for fused, reference in zip(*results):
        assert reference.abs().sum() > 0 and fused.dtype == torch.float64
        torch.testing.assert_close(fused, reference, atol=1e-12, rtol=1e-10)
