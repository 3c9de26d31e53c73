"""Shared factors are one nn.Parameter per module type: one object, gradient summed over every layer."""

import copy

import pytest
import torch
from numerics import summed_gradients_bound
from reference import SHARED_FACTORS, randomize_factors
from tiny_architectures import LLAMA_TARGETS

from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig

SHARING_METHODS = ["sharea", "shareb", "shareab"]
LAYERS = 4


def trainable_in_model(model) -> int:
    """Trainable numbers as torch counts them (model.parameters() yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", *SHARING_METHODS])
def test_shared_factor_is_one_parameter_in_every_layer(tiny_model, method):
    adapter = inject_adapter(tiny_model, AdapterConfig(method=method, targets=LLAMA_TARGETS))
    assert sorted(adapter.groups) == sorted(LLAMA_TARGETS)
    for group in adapter.groups.values():
        layers = [tiny_model.get_submodule(path) for path in group.modules]
        assert len(layers) == LAYERS
        for factor in ("lora_A", "lora_B"):
            objects = {id(getattr(layer, factor)) for layer in layers}
            if factor in SHARED_FACTORS[method]:
                assert objects == {id(group.tensors[factor][0])}
            else:
                assert objects == {id(t) for t in group.tensors[factor]} and len(objects) == LAYERS
    assert trainable_in_model(tiny_model) == adapter.num_trainable()


def per_layer_lora_twin(shared_model, shared_adapter, lora_base):
    """A LoRA model whose layer ℓ holds copies of exactly the factors layer ℓ of the shared model uses."""
    lora = inject_adapter(lora_base, shared_adapter.config.model_copy(update={"method": "lora"}))
    with torch.no_grad():
        for group in shared_adapter.groups.values():
            for path in group.modules:
                for factor in ("lora_A", "lora_B"):
                    getattr(lora_base.get_submodule(path), factor).copy_(
                        getattr(shared_model.get_submodule(path), factor)
                    )
    return lora


def loss_on(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, labels=tokens).loss


@pytest.mark.parametrize("method", SHARING_METHODS)
def test_shared_factor_gradient_sums_every_layer_contribution(tiny_model, method):
    lora_base = copy.deepcopy(tiny_model)
    shared = inject_adapter(tiny_model, AdapterConfig(method=method, targets=["q_proj", "down_proj"]))
    randomize_factors(shared, seed=3)
    lora = per_layer_lora_twin(tiny_model, shared, lora_base)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))

    shared_loss, lora_loss = loss_on(tiny_model, tokens), loss_on(lora_base, tokens)
    torch.testing.assert_close(shared_loss, lora_loss)
    shared_loss.backward()
    lora_loss.backward()

    for group in shared.groups.values():
        for factor in ("lora_A", "lora_B"):
            per_layer = [getattr(lora_base.get_submodule(path), factor).grad for path in group.modules]
            # Every layer contributes, so a sum that missed one would differ.
            assert all(grad.abs().sum() > 0 for grad in per_layer)
            if factor in SHARED_FACTORS[method]:
                bound = summed_gradients_bound(per_layer, uses_per_layer=1, tokens=tokens.numel())
                torch.testing.assert_close(group.tensors[factor][0].grad, sum(per_layer), atol=bound, rtol=0)
            else:
                for tensor, grad in zip(group.tensors[factor], per_layer):
                    bound = summed_gradients_bound([grad], uses_per_layer=1, tokens=tokens.numel())
                    torch.testing.assert_close(tensor.grad, grad, atol=bound, rtol=0)
    assert lora.num_trainable() > shared.num_trainable()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_shared_factors_survive_dtype_cast_as_one_object(tiny_model, dtype):
    adapter = inject_adapter(tiny_model, AdapterConfig(method="shareab", targets=LLAMA_TARGETS))
    before = {name: id(tensor) for name, tensor in adapter.named_tensors().items()}
    count = trainable_in_model(tiny_model)
    tiny_model.to(dtype)
    assert {name: id(tensor) for name, tensor in adapter.named_tensors().items()} == before
    for group in adapter.groups.values():
        for factor, (tensor,) in group.tensors.items():
            assert tensor.dtype == dtype
            assert all(getattr(tiny_model.get_submodule(path), factor) is tensor for path in group.modules)
    assert trainable_in_model(tiny_model) == count == adapter.num_trainable()
