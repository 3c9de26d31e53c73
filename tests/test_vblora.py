"""VB-LoRA: one trainable vector bank for the model, per-layer top-k logits, and settings that must fit the model."""

import pytest
import torch
from numerics import summed_gradients_bound
from reference import TINY_BANK, adapter_config, randomize_factors, vblora_delta
from tiny_architectures import LLAMA_TARGETS

from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, validate
from sharelora_cli.core.errors import UserError

TOKENS = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(9))


def test_one_bank_for_every_layer_and_its_gradient_sums_them_all(tiny_model):
    adapter = inject_adapter(tiny_model, adapter_config("vblora", rank=4, targets=LLAMA_TARGETS))
    bank = adapter.shared["vblora_vector_bank"]
    assert bank.shape == (TINY_BANK["num_vectors"], TINY_BANK["vector_length"]) and bank.requires_grad
    assert all(layer.vblora_vector_bank is bank for layer in adapter.layers())
    assert adapter.parameters()[-1] is bank and bank.abs().max() <= 0.02  # PEFT's U(-0.02, 0.02)
    randomize_factors(adapter, seed=1, scale=0.5)
    tiny_model(TOKENS, labels=TOKENS).loss.backward()
    shared_grad = bank.grad.clone()
    # The same model with a copy of the bank per layer: the shared bank's gradient is the sum of the copies'.
    copies = [torch.nn.Parameter(bank.detach().clone()) for _ in adapter.layers()]
    for layer, copy in zip(adapter.layers(), copies):
        layer.vblora_vector_bank = copy
    tiny_model(TOKENS, labels=TOKENS).loss.backward()
    assert all(copy.grad.abs().sum() > 0 for copy in copies)
    # A and B each gather from the bank: two uses per layer.
    bound = summed_gradients_bound([copy.grad for copy in copies], uses_per_layer=2, tokens=TOKENS.numel())
    torch.testing.assert_close(shared_grad, sum(copy.grad for copy in copies), atol=bound, rtol=0)


def test_delta_is_built_from_the_bank_in_peft_s_layout():
    """A layer (d_in 64, d_out 96) with vector length 32: A has 2 pieces per rank row, B 3 per rank column."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 96))
    adapter = inject_adapter(model, adapter_config("vblora", rank=3, targets=["0"]))
    randomize_factors(adapter, seed=2, scale=1.0)
    (layer,) = adapter.layers()
    assert layer.vblora_logits_A.shape == (3, 2, 16) and layer.vblora_logits_B.shape == (3, 3, 16)
    expected = vblora_delta(layer.vblora_logits_A, layer.vblora_logits_B, layer.vblora_vector_bank, topk=2)
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-6, rtol=1e-5)


def test_a_vector_length_that_does_not_divide_the_model_names_one_that_does(tiny_model):
    before = [type(m) for m in tiny_model.modules()]
    config = AdapterConfig(method="vblora", targets=LLAMA_TARGETS)  # vector_length 256; widths 64, 128, 320
    with pytest.raises(UserError, match=r"adapter\.vblora\.vector_length=256 .* \(64, 128, 320\).* e\.g\. 64$"):
        inject_adapter(tiny_model, config)
    assert [type(m) for m in tiny_model.modules()] == before
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_model.modules())


def test_topk_above_num_vectors_is_a_one_line_recipe_error():
    with pytest.raises(UserError, match=r"adapter\.vblora\.topk: value error, must be at most num_vectors \(4\)"):
        validate({"adapter": {"method": "vblora", "vblora": {"num_vectors": 4, "topk": 5}}})
