"""VeRA: one frozen pair for the whole model, sized for its largest layer, regenerated (never saved), never trained."""

import json

import pytest
import torch
from reference import adapter_config, randomize_factors
from safetensors.torch import load_file
from tiny_architectures import load_tiny_llama

from sharelora_cli.adapters.adapter_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import TrainConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.training.loop import make_optimizer

TARGETS = ["q_proj", "k_proj", "down_proj"]  # (d_in, d_out): (128, 128), (128, 64), (320, 128)
TOKENS = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(3))


def vera(model, rank: int = 8, **settings):
    return inject_adapter(model, adapter_config("vera", rank=rank, targets=TARGETS, vera=settings))


def test_one_pair_for_every_layer_sized_for_the_largest(tiny_model):
    adapter = vera(tiny_model)
    pair = adapter.shared["vera_A"], adapter.shared["vera_B"]
    assert pair[0].shape == (8, 320) and pair[1].shape == (128, 8)  # largest d_in is down_proj's, d_out q/down's
    for layer in adapter.layers():
        assert layer.vera_A is pair[0] and layer.vera_B is pair[1]
        lora_A, lora_B, scaling = layer.low_rank()
        assert lora_A.shape == (8, layer.d_in) and lora_B.shape == (layer.d_out, 8) and scaling == 1.0
        # A layer reads the first d_in columns of A and the first d_out rows of B.
        torch.testing.assert_close(lora_A, layer.vera_lambda_d[:, None] * pair[0][:, : layer.d_in], atol=0, rtol=0)
        torch.testing.assert_close(lora_B, layer.vera_lambda_b[:, None] * pair[1][: layer.d_out], atol=0, rtol=0)


def test_starts_as_the_base_model_with_d_at_d_initial_and_b_zero(tiny_model, tiny_model_dir):
    adapter = vera(tiny_model, d_initial=0.25)
    for layer in adapter.layers():
        assert torch.equal(layer.vera_lambda_d, torch.full((8,), 0.25))
        assert torch.equal(layer.vera_lambda_b, torch.zeros(layer.d_out))
        assert torch.equal(layer.delta_weight(), torch.zeros(layer.d_out, layer.d_in))
    with torch.no_grad():  # the same products as the base (the fused kernel may block them differently)
        torch.testing.assert_close(
            tiny_model(TOKENS).logits, load_tiny_llama(tiny_model_dir)(TOKENS).logits, atol=1e-6, rtol=1e-6
        )


def test_the_pair_is_frozen_uncounted_and_kept_out_of_the_optimizer(tiny_model):
    adapter = vera(tiny_model)
    pair = [adapter.shared["vera_A"], adapter.shared["vera_B"]]
    assert not any(t.requires_grad for t in pair)
    trained = {id(p) for p in adapter.parameters()}
    assert not trained & {id(t) for t in pair}
    # Per module r + d_out: 4 layers of q (8 + 128), k (8 + 64), down (8 + 128).
    assert adapter.num_trainable() == 4 * ((8 + 128) + (8 + 64) + (8 + 128)) == 1376
    assert adapter.num_trainable() == sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    optimizer = make_optimizer(adapter, TrainConfig(), torch.device("cpu"))
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trained
    randomize_factors(adapter, scale=0.5)
    tiny_model(TOKENS, labels=TOKENS).loss.backward()
    assert all(t.grad is None for t in pair)
    assert all(p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_the_pair_is_regenerated_not_saved_and_comes_back_bit_for_bit(tiny_model, tiny_model_dir, tmp_path):
    adapter = vera(tiny_model, projection_seed=11)
    randomize_factors(adapter, scale=0.5)
    save_adapter(adapter, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / WEIGHTS_FILE)
    assert not {"vera_A", "vera_B"} & set(saved) and len(saved) == 2 * len(adapter.layers())
    record = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["regenerated"]
    assert set(record) == {"vera_A", "vera_B"} and "manual_seed(11)" in record["vera_A"]["rule"]
    assert record["vera_A"]["shape"] == [8, 320]
    fresh = load_tiny_llama(tiny_model_dir)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    for name in ("vera_A", "vera_B"):
        assert torch.equal(loaded.shared[name], adapter.shared[name])
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, tiny_model(TOKENS).logits)


def test_a_different_seed_draws_a_different_pair(tiny_model, tiny_model_dir):
    first = vera(tiny_model, projection_seed=1)
    second = vera(load_tiny_llama(tiny_model_dir), projection_seed=2)
    assert not torch.equal(first.shared["vera_A"], second.shared["vera_A"])


@pytest.mark.parametrize("tamper", ["checksum", "seed"])
def test_a_pair_that_would_not_regenerate_identically_is_refused(tiny_model, tiny_model_dir, tmp_path, tamper):
    save_adapter(vera(tiny_model, projection_seed=11), tmp_path / "adapter")
    path = tmp_path / "adapter" / CONFIG_FILE
    config = json.loads(path.read_text())
    if tamper == "checksum":  # what another torch build drawing other numbers would look like
        config["regenerated"]["vera_B"]["sha256"] = "0" * 64
    else:
        config["adapter"]["vera"]["projection_seed"] = 12
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="regenerated tensor vera_[AB] differs"):
        load_adapter(load_tiny_llama(tiny_model_dir), tmp_path / "adapter")
