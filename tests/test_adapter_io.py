"""An adapter saved alone reloads into a fresh base with identical outputs; bad files fail cleanly."""

import copy
import json

import pytest
import torch
from reference import METHODS, SHARED_FACTORS, adapter_config, randomize_factors
from safetensors.torch import load_file, save_file
from tiny_architectures import GPT2_TARGETS, LLAMA_TARGETS, load_tiny_llama, narrow_llama, tiny_gpt2

from sharelora_cli.adapters.adapter_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter_config, save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.core.errors import UserError

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(12))


def save_random_adapter(model, directory, method: str = "sharea", targets=LLAMA_TARGETS):
    adapter = inject_adapter(model, adapter_config(method, rank=4, alpha=8, targets=targets))
    randomize_factors(adapter, seed=11)
    save_adapter(adapter, directory, base_model="tiny-test", extra={"note": "kept"})
    return adapter


def assert_same_adapter(loaded, saved) -> None:
    assert loaded.config == saved.config
    assert loaded.plan() == saved.plan()
    assert loaded.num_trainable() == saved.num_trainable()
    saved_tensors = saved.named_tensors()
    for name, tensor in loaded.named_tensors().items():
        assert torch.equal(tensor, saved_tensors[name]), name
    for group in loaded.groups.values():
        for factor in SHARED_FACTORS[loaded.config.method]:
            (tensor,) = group.tensors[factor]
            assert all(getattr(loaded.model.get_submodule(path), factor) is tensor for path in group.modules)


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reloads_into_fresh_base_with_identical_outputs(tiny_model, tiny_model_dir, tmp_path, method):
    saved = save_random_adapter(tiny_model, tmp_path / "adapter", method)
    fresh = load_tiny_llama(tiny_model_dir)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert_same_adapter(loaded, saved)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, tiny_model(TOKENS).logits)
    config = read_adapter_config(tmp_path / "adapter")
    assert (config["format_version"], config["base_model"], config["note"]) == (1, "tiny-test", "kept")
    assert config["trainable_parameters"] == saved.num_trainable()


def test_conv1d_adapter_with_two_shapes_per_name_round_trips(tmp_path):
    model = tiny_gpt2()
    fresh = copy.deepcopy(model)
    saved = save_random_adapter(model, tmp_path / "adapter", "sharea", GPT2_TARGETS)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert_same_adapter(loaded, saved)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, model(TOKENS).logits)


def model_state(model) -> tuple[dict, dict]:
    """Module types by path, and every parameter's value and requires_grad flag."""
    modules = {name: type(module) for name, module in model.named_modules()}
    params = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    return modules, params


def assert_load_fails_untouched(model, directory, *named) -> None:
    modules, params = model_state(model)
    with pytest.raises(UserError) as caught:
        load_adapter(model, directory)
    message = str(caught.value)
    assert "\n" not in message
    for text in named:
        assert text in message, message
    after_modules, after_params = model_state(model)
    assert after_modules == modules
    assert after_params.keys() == params.keys()
    for name, (value, requires_grad) in params.items():
        assert torch.equal(after_params[name][0], value) and after_params[name][1] == requires_grad, name


@pytest.fixture
def saved_dir(tiny_model_dir, tmp_path):
    directory = tmp_path / "adapter"
    save_random_adapter(load_tiny_llama(tiny_model_dir), directory)
    return directory


def test_truncated_weights_are_a_user_error_and_leave_model_untouched(tiny_model, saved_dir):
    weights = saved_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_load_fails_untouched(tiny_model, saved_dir, str(weights), "corrupt or truncated")


def test_corrupt_weights_are_a_user_error_and_leave_model_untouched(tiny_model, saved_dir):
    weights = saved_dir / WEIGHTS_FILE
    weights.write_bytes(b"\x07" * weights.stat().st_size)
    assert_load_fails_untouched(tiny_model, saved_dir, str(weights))


def test_weights_missing_a_tensor_are_a_user_error(tiny_model, saved_dir):
    weights = saved_dir / WEIGHTS_FILE
    tensors = load_file(weights)
    del tensors["q_proj.lora_B.2"]
    save_file(tensors, weights)
    assert_load_fails_untouched(tiny_model, saved_dir, str(weights), "q_proj.lora_B.2")


def test_missing_config_is_a_user_error_and_leaves_model_untouched(tiny_model, saved_dir):
    (saved_dir / CONFIG_FILE).unlink()
    assert_load_fails_untouched(tiny_model, saved_dir, str(saved_dir / CONFIG_FILE), "not found")


def test_corrupt_config_is_a_user_error_and_leaves_model_untouched(tiny_model, saved_dir):
    config = saved_dir / CONFIG_FILE
    config.write_text(config.read_text()[:100])
    assert_load_fails_untouched(tiny_model, saved_dir, str(config), "corrupt")


def test_config_with_unknown_method_is_a_user_error(tiny_model, saved_dir):
    config = saved_dir / CONFIG_FILE
    values = json.loads(config.read_text())
    values["adapter"]["method"] = "dora"
    config.write_text(json.dumps(values))
    assert_load_fails_untouched(tiny_model, saved_dir, str(config), "dora")


def test_adapter_for_other_shapes_names_the_mismatched_module(tiny_model, tmp_path):
    save_random_adapter(narrow_llama(), tmp_path / "adapter")
    assert_load_fails_untouched(tiny_model, tmp_path / "adapter", "model.layers.0.self_attn.q_proj", "(64, 64)")


def test_adapter_for_other_architecture_names_the_missing_module(tiny_model, tmp_path):
    save_random_adapter(tiny_gpt2(), tmp_path / "adapter", targets=GPT2_TARGETS)
    assert_load_fails_untouched(tiny_model, tmp_path / "adapter", "no module 'transformer.h.0.attn.c_attn'")
