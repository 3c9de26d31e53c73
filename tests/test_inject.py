"""Choosing target modules: by type name or by regex; anything that matches nothing says what exists."""

import pytest
from tiny_architectures import LLAMA_TARGETS

from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.core.errors import UserError


def adapted_paths(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, AdaptedLayer)]


def inject_error(model, **config) -> str:
    with pytest.raises(UserError) as caught:
        inject_adapter(model, AdapterConfig(**config))
    return str(caught.value)


def test_targets_select_every_layer_of_each_named_type(tiny_model):
    adapter = inject_adapter(tiny_model, AdapterConfig(targets=["k_proj", "mlp.down_proj"]))
    expected = [f"model.layers.{i}.{kind}" for i in range(4) for kind in ("self_attn.k_proj", "mlp.down_proj")]
    assert adapted_paths(tiny_model) == expected
    assert adapter.groups["k_proj"].modules == expected[0::2]
    # The base weight moves under base_layer; the module path itself is unchanged.
    assert "model.layers.0.self_attn.k_proj.base_layer.weight" in dict(tiny_model.named_parameters())


def test_unknown_target_is_named_with_the_module_types(tiny_model):
    message = inject_error(tiny_model, targets=["q_proj", "qv_proj"])
    assert "'qv_proj' matches no module" in message
    assert all(kind in message for kind in [*LLAMA_TARGETS, "lm_head"])
    assert adapted_paths(tiny_model) == []
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_target_that_is_not_linear_is_rejected(tiny_model):
    message = inject_error(tiny_model, targets=["self_attn"])
    assert "'model.layers.0.self_attn' is a LlamaAttention" in message


def test_target_regex_selects_only_full_name_matches(tiny_model):
    inject_adapter(tiny_model, AdapterConfig(target_regex=r"model\.layers\.[13]\.self_attn\.(q|o)_proj"))
    assert adapted_paths(tiny_model) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.o_proj",
    ]


def test_target_regex_matching_nothing_is_a_user_error(tiny_model):
    assert "matches no module" in inject_error(tiny_model, target_regex=r"layers\.9\..*")


def test_invalid_target_regex_is_a_user_error(tiny_model):
    assert "not a valid regex" in inject_error(tiny_model, target_regex="q_proj(")
