"""LoRA, MiSS, VeRA and VB-LoRA give PEFT's outputs and gradients on the same base weights and factors (fp32).

sharelora runs its fused path here (q/k/v and gate/up computed together, adapters/fusion.py), which
find_shared_inputs switches on before the first compared forward.
"""

import pytest
import torch
from peft import LoraConfig, MissConfig, VBLoRAConfig, VeraConfig, get_peft_model
from reference import TINY_BANK, adapter_config, randomize_factors
from tiny_architectures import LLAMA_TARGETS, load_tiny_llama

from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig


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
    assert_same_gradients(
        adapter,
        peft_model,
        lambda ours, theirs: [
            (ours.lora_A.grad, theirs.lora_A["default"].weight.grad),
            (ours.lora_B.grad, theirs.lora_B["default"].weight.grad),
        ],
        tiny_model.config.vocab_size,
    )


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
    assert_same_gradients(
        adapter,
        peft_model,
        lambda ours, theirs: [(ours.miss_D.grad, theirs.miss_block["default"].grad)],
        tiny_model.config.vocab_size,
    )


def tokens_for(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))


def peft_layers(adapter, peft_model):
    """(our layer, PEFT's layer) for every adapted module."""
    for path in (path for group in adapter.groups.values() for path in group.modules):
        yield adapter.model.get_submodule(path), peft_model.base_model.model.get_submodule(path)


def assert_same_logits_and_gradients(ours, theirs, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Same logits, and the same gradient for every (our tensor, PEFT's tensor) pair after the same loss."""
    tokens = tokens_for(ours)
    ours_out, theirs_out = ours(tokens, labels=tokens), theirs(input_ids=tokens, labels=tokens)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, atol=1e-5, rtol=1e-5)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for mine, peft_tensor in pairs:
        assert mine.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, peft_tensor.grad, atol=1e-5, rtol=1e-5)


def vera_setup(tiny_model, tiny_model_dir, seed: int, rank: int = 8):
    adapter = inject_adapter(
        tiny_model, adapter_config("vera", rank=rank, targets=LLAMA_TARGETS, vera={"projection_seed": seed})
    )
    peft_config = VeraConfig(r=rank, target_modules=LLAMA_TARGETS, projection_prng_key=seed)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    return adapter, get_peft_model(load_tiny_llama(tiny_model_dir), peft_config)


@pytest.mark.parametrize("seed", [0, 1234])
def test_vera_regenerates_peft_s_projections_from_the_same_seed(tiny_model, tiny_model_dir, seed):
    adapter, peft_model = vera_setup(tiny_model, tiny_model_dir, seed)
    for name in ("vera_A", "vera_B"):
        assert torch.equal(adapter.shared[name], getattr(peft_model.base_model, name)["default"]), name
    # Sized for the largest layer: gate/up produce 320, down_proj reads 320.
    assert adapter.shared["vera_A"].shape == (8, 320) and adapter.shared["vera_B"].shape == (320, 8)
    # And PEFT's initial vectors: d = d_initial (0.1), b = 0.
    for ours, theirs in peft_layers(adapter, peft_model):
        assert torch.equal(ours.vera_lambda_d, theirs.vera_lambda_d["default"])
        assert torch.equal(ours.vera_lambda_b, theirs.vera_lambda_b["default"])


def test_vera_outputs_and_gradients_match_peft(tiny_model, tiny_model_dir):
    adapter, peft_model = vera_setup(tiny_model, tiny_model_dir, seed=5)
    randomize_factors(adapter, seed=12, scale=0.5)
    pairs = []
    with torch.no_grad():
        for ours, theirs in peft_layers(adapter, peft_model):
            for name in ("vera_lambda_d", "vera_lambda_b"):
                getattr(theirs, name)["default"].copy_(getattr(ours, name))
                pairs.append((getattr(ours, name), getattr(theirs, name)["default"]))
    assert_same_logits_and_gradients(tiny_model, peft_model, pairs)
    assert fused_groups(adapter) == [1, 2, 3]


def test_vblora_with_peft_s_bank_and_logits_matches_peft(tiny_model, tiny_model_dir):
    """PEFT draws its bank and logits from the global RNG in its own order: ours are loaded from PEFT's."""
    rank, topk = 4, 3
    peft_config = VBLoRAConfig(r=rank, target_modules=LLAMA_TARGETS, topk=topk, **TINY_BANK)
    torch.manual_seed(3)
    peft_model = get_peft_model(load_tiny_llama(tiny_model_dir), peft_config)
    adapter = inject_adapter(
        tiny_model, adapter_config("vblora", rank=rank, targets=LLAMA_TARGETS, vblora={**TINY_BANK, "topk": topk})
    )
    peft_bank = peft_model.base_model.vblora_vector_bank["default"]
    with torch.no_grad():
        peft_bank.mul_(20)  # PEFT's ±0.02 bank barely moves the logits; a larger one makes the comparison bite
        adapter.shared["vblora_vector_bank"].copy_(peft_bank)
    pairs = [(adapter.shared["vblora_vector_bank"], peft_bank)]
    with torch.no_grad():
        for ours, theirs in peft_layers(adapter, peft_model):
            for name in ("vblora_logits_A", "vblora_logits_B"):
                getattr(ours, name).copy_(getattr(theirs, name)["default"])
                pairs.append((getattr(ours, name), getattr(theirs, name)["default"]))
    base = load_tiny_llama(tiny_model_dir)
    tokens = tokens_for(base)
    find_shared_inputs(tiny_model, torch.device("cpu"))
    with torch.no_grad():
        assert (tiny_model(tokens).logits - base(tokens).logits).abs().max() > 0.01
    assert_same_logits_and_gradients(tiny_model, peft_model, pairs)
    assert fused_groups(adapter) == [1, 2, 3]
