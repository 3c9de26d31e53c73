"""The adapters' hand-written autograd nodes give the true gradients, and the fused path equals the plain formula.

The nodes (adapters/low_rank_function.py) are checked against finite differences in float64; the
layers' fused path (adapters/fusion.py: modules that read one input computed together) against
`plain_forward`, the formula differentiated by autograd, on real models.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import adapter_config, expected_delta, randomize_factors
from tiny_architectures import LLAMA_TARGETS
from torch import nn
from transformers.pytorch_utils import Conv1D

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, layer_shape, plain_frozen_weight
from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.adapters.low_rank_function import AddLowRank, FusedPart, GroupLayout, SharedInputProduct
from sharelora_cli.adapters.miss import MissLayer, chunk_sum_matrix
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.training.loop import adamw

D_IN, D_OUT, RANK = 6, 5, 3


def double(*shape, grad=True, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def group_node(x, x_a, As, fused, returned=()):
    """SharedInputProduct over As (x: tokens × d_in); fused: (block, scaling, weight, bias, B) per module computed whole."""
    parts = tuple(FusedPart(block, s, weight, bias, B.detach(), B.detach().t()) for block, s, weight, bias, B in fused)
    layout = GroupLayout(tuple(A.shape[0] for A in As), torch.cat([A.detach() for A in As]), parts, tuple(returned))
    return SharedInputProduct.apply(layout, x, x_a, *As, *(B for *_, B in fused))


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_base_and_delta_gradients_match_finite_differences(with_bias):
    x, A, B = double(8, D_IN, seed=1), double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3)
    weight = double(D_OUT, D_IN, grad=False, seed=4)
    bias = double(D_OUT, grad=False, seed=5) if with_bias else None
    (y,) = group_node(x, x, [A], [(0, 0.7, weight, bias, B)])
    torch.testing.assert_close(y, F.linear(x, weight, bias) + 0.7 * (x @ A.t()) @ B.t())
    assert torch.autograd.gradcheck(lambda x, A, B: group_node(x, x, [A], [(0, 0.7, weight, bias, B)]), (x, A, B))


def test_group_of_modules_reading_one_input_matches_finite_differences():
    """Three modules, two of them sharing one A (as MiSS's q/k/v do), one with its own base output: every gradient."""
    x = double(6, D_IN, seed=1)
    A1, A2 = double(RANK, D_IN, seed=2), double(2, D_IN, seed=3)
    B1, B2, B3 = double(D_OUT, RANK, seed=4), double(4, RANK, seed=5), double(7, 2, seed=6)
    W1, W2 = double(D_OUT, D_IN, grad=False, seed=7), double(4, D_IN, grad=False, seed=8)
    W3 = double(7, D_IN, grad=False, seed=9)

    def outputs(x, A1, A2, B1, B2, B3):
        y1, y2, h2 = group_node(x, x, [A1, A2], [(0, 0.5, W1, None, B1), (0, 2.0, W2, None, B2)], returned=[1])
        y3 = AddLowRank.apply(F.linear(x, W3), h2, B3, B3.detach(), B3.detach().t(), 1.5)
        return y1, y2, y3

    y1, y2, y3 = outputs(x, A1, A2, B1, B2, B3)
    torch.testing.assert_close(y1, x @ W1.t() + 0.5 * (x @ A1.t()) @ B1.t())
    torch.testing.assert_close(y2, x @ W2.t() + 2.0 * (x @ A1.t()) @ B2.t())
    torch.testing.assert_close(y3, x @ W3.t() + 1.5 * (x @ A2.t()) @ B3.t())
    assert torch.autograd.gradcheck(outputs, (x, A1, A2, B1, B2, B3))


def test_separate_adapter_input_gets_its_own_gradient():
    # Dropout gives the adapter a different tensor than the base: each must get only its own term.
    x, x_a = double(3, D_IN, seed=1), double(3, D_IN, seed=6)
    A, B, weight = double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3), double(D_OUT, D_IN, grad=False, seed=4)
    assert torch.autograd.gradcheck(
        lambda x, x_a, A, B: group_node(x, x_a, [A], [(0, 2.0, weight, None, B)]), (x, x_a, A, B)
    )


def test_delta_added_to_a_foreign_output_matches_finite_differences():
    x, A, B = double(6, D_IN, seed=1), double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3)
    base_out = double(6, D_OUT, seed=4)

    def delta_only(x, A, B, base_out):
        (h,) = group_node(x, x, [A], [], returned=[0])
        return AddLowRank.apply(base_out, h, B, B.detach(), B.detach().t(), 1.5)

    assert torch.autograd.gradcheck(delta_only, (x, A, B, base_out))


def test_foreign_output_is_never_changed_in_place():
    base_out = torch.ones(2, D_OUT)
    h, B = torch.ones(2, RANK), torch.ones(D_OUT, RANK)
    out = AddLowRank.apply(base_out, h, B, B, B.t(), 0.5)
    torch.testing.assert_close(base_out, torch.ones(2, D_OUT))
    torch.testing.assert_close(out, torch.full((2, D_OUT), 1 + 0.5 * RANK))


def test_input_without_grad_still_trains_the_factors():
    x, A, B = double(4, D_IN, grad=False, seed=1), double(RANK, D_IN, seed=2), double(D_OUT, RANK, seed=3)
    weight = double(D_OUT, D_IN, grad=False, seed=4)
    group_node(x, x, [A], [(0, 0.5, weight, None, B)])[0].square().sum().backward()
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
    layer = MissLayer(
        nn.Linear(11, 2).requires_grad_(False), {"miss_D": nn.Parameter(torch.ones(4, 2))}, Hyper(4, 1.0, 0.0, False)
    )
    layer(torch.ones(1, 11)).sum().backward()
    # Chunks of 11 ones at rank 4: columns 0-2 appear three times, column 3 twice.
    torch.testing.assert_close(layer.miss_D.grad, torch.tensor([[3.0, 3.0], [3.0, 3.0], [3.0, 3.0], [2.0, 2.0]]))


# ---------------------------------------------------------------- the fused path on whole models


def group_names(adapter) -> list[list[str]]:
    """The groups of one transformer block, as module types (adapters/fusion.py's grouping)."""
    layers = [layer for layer in adapter.layers() if ".layers.0." in layer_path(adapter, layer)]
    groups = {
        id(layer.group): [layer_path(adapter, m).rsplit(".", 1)[-1] for m in layer.group.members] for layer in layers
    }
    return sorted(groups.values())


def layer_path(adapter, layer) -> str:
    return next(
        path
        for group in adapter.groups.values()
        for path in group.modules
        if adapter.model.get_submodule(path) is layer
    )


def loss_and_gradients(model, adapter, tokens, plain: bool) -> list[torch.Tensor]:
    layers = adapter.layers()
    if plain:
        for layer in layers:
            layer.forward = layer.plain_forward
    try:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    result = [loss.detach()] + [p.grad.clone() for p in adapter.parameters()]
    model.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("method", ["lora", "sharea", "shareab", "aslora", "miss", "vera", "tied-lora", "vblora"])
def test_fused_model_equals_the_plain_formula_in_loss_and_every_gradient(tiny_model, method):
    adapter = inject_adapter(tiny_model, adapter_config(method, rank=4, targets=LLAMA_TARGETS))
    randomize_factors(adapter, seed=2)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    tiny_model.train()
    fused = loss_and_gradients(tiny_model, adapter, tokens, plain=False)
    assert group_names(adapter) == [["down_proj"], ["gate_proj", "up_proj"], ["o_proj"], ["q_proj", "k_proj", "v_proj"]]
    plain = loss_and_gradients(tiny_model, adapter, tokens, plain=True)
    for got, expected in zip(fused, plain):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def logits_on_both_paths(model, adapter, tokens, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the fused path, then of the plain formula, on the same factors."""
    results = []
    for plain in (False, True):
        if plain:
            for layer in adapter.layers():
                layer.forward = layer.plain_forward
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(model(input_ids=tokens).logits.float())
        for layer in adapter.layers():
            layer.__dict__.pop("forward", None)
    return results[0], results[1]


@pytest.mark.parametrize("method", ["lora", "sharea", "shareb"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_path_sees_every_optimizer_step(tiny_model, method, autocast):
    """Concatenated and cast factors are rebuilt at each forward pass: torch's fused AdamW, which sharelora
    trains with, changes the parameters without bumping their version counters."""
    adapter = inject_adapter(tiny_model, AdapterConfig(method=method, rank=4, targets=LLAMA_TARGETS))
    randomize_factors(adapter, seed=5)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = adamw(adapter.parameters(), lr=0.02, weight_decay=0.0)
    previous = None
    for _ in range(2):
        tiny_model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = tiny_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fused, plain = logits_on_both_paths(tiny_model, adapter, tokens, autocast)
        # bf16 carries 8 significant bits; the logits here are O(1).
        torch.testing.assert_close(fused, plain, **({"atol": 3e-2, "rtol": 2e-2} if autocast else {}))
        assert previous is None or (fused - previous).abs().max() > 0.1  # the step changed the model's output
        previous = fused


class ComputedFactorsLayer(AdaptedLayer):
    """A method whose A and B are computed at each call from frozen matrices and trained vectors (as VeRA's)."""

    factor_names = ("frozen_A", "frozen_B", "vector_d", "vector_b")

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.vector_d[:, None] * self.frozen_A, self.vector_b[:, None] * self.frozen_B, 0.5


def test_computed_and_frozen_factors_train_through_the_fused_path_like_the_plain_one():
    torch.manual_seed(0)
    block = nn.ModuleDict({name: nn.Linear(8, d_out) for name, d_out in (("q", 8), ("k", 4), ("v", 4))})
    hyper = Hyper(rank=3, alpha=1.0, dropout=0.0, rslora=False)
    for name in list(block):
        d_out = block[name].out_features
        shapes = {"frozen_A": (3, 8), "frozen_B": (d_out, 3), "vector_d": (3,), "vector_b": (d_out,)}
        factors = {
            f: nn.Parameter(torch.randn(shape), requires_grad=f.startswith("vector")) for f, shape in shapes.items()
        }
        block[name] = ComputedFactorsLayer(block[name].requires_grad_(False), factors, hyper)
    fusion = block["q"].fusion
    for layer in block.values():
        layer.fusion = fusion
    vectors = [p for p in block.parameters() if p.requires_grad]
    x = torch.randn(2, 5, 8, requires_grad=True)
    results = []
    for run in ("discover", "fused", "plain"):
        fusion.start_forward()
        call = (lambda layer: layer.plain_forward) if run == "plain" else (lambda layer: layer)
        outputs = [call(block[name])(x) for name in ("q", "k", "v")]
        sum(o.square().sum() for o in outputs).backward()
        results.append([o.detach() for o in outputs] + [x.grad] + [p.grad for p in vectors])
        x.grad = None
        for p in vectors:
            p.grad = None
    assert [len(layer.group.members) for layer in block.values()] == [3, 3, 3]
    assert all(p.grad is None for p in block.parameters() if not p.requires_grad)
    for runs in zip(*results):
        for got in runs[:2]:
            torch.testing.assert_close(got, runs[2], atol=1e-5, rtol=1e-5)


def test_a_sibling_called_with_another_input_is_computed_alone_then_leaves_the_group():
    torch.manual_seed(0)
    first, second = lora_layer(nn.Linear(D_IN, D_OUT)), lora_layer(nn.Linear(D_IN, D_OUT))
    second.fusion = fusion = first.fusion
    x, other = torch.randn(4, D_IN), torch.randn(4, D_IN)
    fusion.start_forward()
    first(x), second(x)  # the same tensor: second joins first's group at the next pass
    fusion.start_forward()
    assert first.group is second.group
    first(x)  # as leader, it leaves second's result for x pending
    torch.testing.assert_close(second(other), reference_output(second, other))
    fusion.start_forward()
    assert first.group is not second.group and first.group.members == [first]


# (method, its settings, whether A trains, distinct A's among q, k and v: ShareA shares across layers, not types)
SAVED_CASES = {
    "lora": ({}, True, 3),
    "sharea": ({}, True, 3),
    "shareab": ({}, True, 3),
    "vera": ({}, True, 3),
    "miss": ({}, False, 1),  # one chunk-sum matrix for every layer of a width
    "tied-lora-frozen-A": ({"tied_lora": {"train": ["B", "v"]}}, False, 3),  # u ⊙ A is computed per layer
}


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_frozen_a_saves_nothing_of_the_input_and_trained_a_one_copy_per_group(tiny_model, case):
    """For backward, a fixed A (MiSS, Tied-LoRA with A and u frozen) keeps only the r-wide products (MiSS: the chunk
    sum); a trained A one copy of the input for q, k and v together."""
    settings, a_trains, distinct_As = SAVED_CASES[case]
    method = case.removesuffix("-frozen-A")
    adapter = inject_adapter(tiny_model, adapter_config(method, rank=4, targets=LLAMA_TARGETS, **settings))
    find_shared_inputs(tiny_model, torch.device("cpu"))
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    block = tiny_model.model.layers[0]
    x = block.input_layernorm(tiny_model.model.embed_tokens(tokens)).detach().requires_grad_()
    widths = []

    def record(tensor):
        if tensor.dim() == 2 and tensor.shape[0] == tokens.numel():  # activations, not weights
            widths.append(tensor.shape[1])
        return tensor

    adapter.layers()[0].fusion.start_forward()  # a new pass, with the groups the probe found
    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        block.self_attn.q_proj(x)  # the leader of q, k and v
    assert widths == [tiny_model.config.hidden_size] * a_trains + [distinct_As * 4]


@pytest.mark.parametrize("method", ["lora", "sharea", "miss", "vera", "tied-lora", "vblora"])
def test_gradient_checkpointing_recomputes_to_the_same_factor_gradients(tiny_model, method):
    adapter = inject_adapter(tiny_model, adapter_config(method, rank=4, targets=LLAMA_TARGETS))
    randomize_factors(adapter)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tiny_model.train()
        tiny_model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append([p.grad.clone() for p in adapter.parameters()])
        adapter.model.zero_grad(set_to_none=True)
    assert group_names(adapter)[-1] == ["q_proj", "k_proj", "v_proj"]  # checkpointed blocks ran the fused path
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


def test_inference_mode_runs_the_fused_path_and_gives_the_plain_formula(tiny_model):
    """Evaluation runs under torch.inference_mode, whose tensors have no version counter to group by."""
    adapter = inject_adapter(tiny_model, AdapterConfig(method="lora", rank=4, targets=LLAMA_TARGETS))
    randomize_factors(adapter, seed=3)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    tiny_model.eval()
    with torch.inference_mode():
        for _ in range(2):  # the first pass finds the groups, the second runs them
            fused = tiny_model(input_ids=tokens).logits
    assert group_names(adapter) == [["down_proj"], ["gate_proj", "up_proj"], ["o_proj"], ["q_proj", "k_proj", "v_proj"]]
    _, plain = logits_on_both_paths(tiny_model, adapter, tokens, autocast=False)
    torch.testing.assert_close(fused, plain)
