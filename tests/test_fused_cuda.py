"""On a CUDA GPU, the fused adapter path equals the plain formula: float32, bf16 autocast, and a 4-bit NF4 base.

CI has no GPU, so these skip there; scripts/gpu_check.sh runs them where one is present. The same
checks run on CPU in test_low_rank_function.py.
"""

import pytest
import torch
from reference import randomize_factors
from tiny_architectures import LLAMA_TARGETS

from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, ModelConfig, QuantizationConfig
from sharelora_cli.models.loading import load_model
from sharelora_cli.training.loop import adamw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# name -> (4-bit base, autocast, tolerance): bf16 carries 8 significant bits, the losses here are O(10).
SETTINGS = {
    "fp32": (False, False, {"atol": 1e-5, "rtol": 1e-4}),
    "bf16-autocast": (False, True, {"atol": 5e-2, "rtol": 2e-2}),
    "nf4-bf16-autocast": (True, True, {"atol": 5e-2, "rtol": 2e-2}),
}


def adapted_model(model_dir, method: str, nf4: bool):
    quant = QuantizationConfig(load_in_4bit=nf4, compute_dtype="bfloat16")
    model = load_model(ModelConfig(name_or_path=str(model_dir), dtype="float32"), quant, CUDA)
    adapter = inject_adapter(model, AdapterConfig(method=method, rank=4, targets=LLAMA_TARGETS))
    randomize_factors(adapter, seed=3)
    find_shared_inputs(model, CUDA)
    return model, adapter


def loss_and_gradients(model, adapter, tokens, plain: bool, autocast: bool) -> list[torch.Tensor]:
    """One forward and backward on the fused path or (plain) the formula; the gradients are taken, not kept."""
    if plain:
        for layer in adapter.layers():
            layer.forward = layer.plain_forward
    try:
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    finally:
        for layer in adapter.layers():
            layer.__dict__.pop("forward", None)
    result = [loss.detach().float()] + [p.grad.clone() for p in adapter.parameters()]
    model.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", ["lora", "sharea", "miss"])
def test_fused_path_equals_the_plain_formula_on_cuda(tiny_model_dir, method, setting):
    nf4, autocast, tolerance = SETTINGS[setting]
    model, adapter = adapted_model(tiny_model_dir, method, nf4)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).to(CUDA)
    fused = loss_and_gradients(model, adapter, tokens, plain=False, autocast=autocast)
    assert max(len(layer.group.members) for layer in adapter.layers()) == 3  # q/k/v ran as one group
    plain = loss_and_gradients(model, adapter, tokens, plain=True, autocast=autocast)
    for got, expected in zip(fused, plain):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("setting", ["fp32", "nf4-bf16-autocast"])
def test_fused_path_sees_every_fused_adamw_step_on_cuda(tiny_model_dir, setting):
    nf4, autocast, tolerance = SETTINGS[setting]
    model, adapter = adapted_model(tiny_model_dir, "sharea", nf4)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).to(CUDA)
    optimizer = adamw(adapter.parameters(), lr=0.02, weight_decay=0.0)
    for _ in range(2):
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fused = loss_and_gradients(model, adapter, tokens, plain=False, autocast=autocast)[0]
        plain = loss_and_gradients(model, adapter, tokens, plain=True, autocast=autocast)[0]
        torch.testing.assert_close(fused, plain, **tolerance)
