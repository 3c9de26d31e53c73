"""LoRA and MiSS give PEFT's outputs and gradients on the same base weights and factors (fp32, 1e-5).

sharelora runs its fused path here (q/k/v and gate/up computed together, adapters/fusion.py), which
find_shared_inputs switches on before the first compared forward.
"""

import pytest
import torch
from peft import LoraConfig, MissConfig, get_peft_model
from reference import randomize_factors
from tiny_architectures import LLAMA_TARGETS, load_tiny_llama

from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.inject import inject_adapter
from sharelora_cli.recipe import AdapterConfig


def copy_into_peft(adapter, peft_model, copy_layer) -> None:
    with torch.no_grad():
        for path in (path for group in adapter.groups.values() for path in group.modules):
            copy_layer(adapter.model.get_submodule(path), peft_model.base_model.model.get_submodule(path))


def copy_lora(ours, theirs) -> None:
    theirs.lora_A["default"].weight.copy_(ours.lora_A)
    theirs.lora_B["default"].weight.copy_(ours.lora_B)


def copy_miss(ours, theirs) -> None:
    theirs.miss_block["default"].copy_(ours.miss_D)


def assert_same_logits(ours, theirs, vocab_size: int) -> None:
    tokens = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = theirs(input_ids=tokens).logits
        torch.testing.assert_close(ours(tokens).logits, expected, atol=1e-5, rtol=1e-5)


def assert_same_gradients(adapter, peft_model, factor_grads, vocab_size: int) -> None:
    """Both models trained one backward on the same batch: every factor gets PEFT's gradient."""
    tokens = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(9))
    for model in (adapter.model, peft_model):
        model.train()
        model(input_ids=tokens, labels=tokens).loss.backward()
    for path in (path for group in adapter.groups.values() for path in group.modules):
        ours, theirs = adapter.model.get_submodule(path), peft_model.base_model.model.get_submodule(path)
        for our_grad, their_grad in factor_grads(ours, theirs):
            assert their_grad.abs().sum() > 0
            torch.testing.assert_close(our_grad, their_grad, atol=1e-6, rtol=1e-4)


def fused_groups(adapter) -> list[int]:
    """Sizes of the groups the adapted layers run in: q/k/v (3), gate/up (2), o and down alone (1)."""
    return sorted({len(layer.group.members) for layer in adapter.layers()})


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(tiny_model, tiny_model_dir, rslora):
    adapter = inject_adapter(
        tiny_model, AdapterConfig(method="lora", rank=8, alpha=16, targets=LLAMA_TARGETS, rslora=rslora)
    )
    randomize_factors(adapter, seed=9)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LLAMA_TARGETS, use_rslora=rslora)
    peft_model = get_peft_model(load_tiny_llama(tiny_model_dir), peft_config).eval()
    copy_into_peft(adapter, peft_model, copy_lora)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    assert_same_logits(tiny_model, peft_model, tiny_model.config.vocab_size)
    assert fused_groups(adapter) == [1, 2, 3]
    assert_same_gradients(adapter, peft_model, lambda ours, theirs: [
        (ours.lora_A.grad, theirs.lora_A["default"].weight.grad),
        (ours.lora_B.grad, theirs.lora_B["default"].weight.grad)], tiny_model.config.vocab_size)


@pytest.mark.parametrize("rank", [16, 12], ids=["rank-divides-d_in", "rank-pads-d_in"])
def test_miss_matches_peft(tiny_model, tiny_model_dir, rank):
    adapter = inject_adapter(tiny_model, AdapterConfig(method="miss", rank=rank, targets=LLAMA_TARGETS))
    randomize_factors(adapter, seed=10)
    peft_config = MissConfig(r=rank, target_modules=LLAMA_TARGETS, init_weights=True)
    peft_model = get_peft_model(load_tiny_llama(tiny_model_dir), peft_config).eval()
    copy_into_peft(adapter, peft_model, copy_miss)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    assert_same_logits(tiny_model, peft_model, tiny_model.config.vocab_size)
    assert fused_groups(adapter) == [1, 2, 3]
    assert_same_gradients(adapter, peft_model, lambda ours, theirs: [
        (ours.miss_D.grad, theirs.miss_block["default"].grad)], tiny_model.config.vocab_size)
