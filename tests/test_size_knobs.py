"""Each method's size knob: the value nearest a parameter budget, found by doubling and bisecting, is nearer than
every other value, and every registered method whose knob is marked monotone has a count that grows with it
(what the search assumes)."""

import pytest
from transformers import LlamaConfig

from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.adapters.size_knobs import RANK, SIZE_KNOBS, final_trainable, knob_of, nearest_value, with_knob
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.models.loading import build_on_meta

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS, HIDDEN, FFN, KV = 12, 32, 80, 16


@pytest.fixture(scope="module")
def deep_model():
    """A 12-layer Llama on the meta device: hidden 32, ffn 80, k/v width 16 (2 of 4 heads of 8)."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return build_on_meta(config)


def adapter(method: str, value: int) -> AdapterConfig:
    # Knobs other than the rank are turned at rank 2; VB-LoRA's vectors of 16 divide every width.
    settings = {"method": method, "rank": 2, "targets": TARGETS, "vblora": {"vector_length": 16}}
    return AdapterConfig(**with_knob(settings, knob_of(method), value))


def count_of(model, method: str):
    return lambda value: final_trainable(model, adapter(method, value))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_grows_with_its_knob(deep_model, method):
    knob = knob_of(method)
    if not knob.monotone:
        pytest.skip(f"{method}'s count is not monotone in {knob.path}: its search counts every value")
    counts = [count_of(deep_model, method)(v) for v in range(knob.minimum, knob.minimum + 12)]
    assert counts == sorted(counts) and counts[-1] > counts[0]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("lora_rank", [1, 2, 8])
def test_nearest_value_is_the_nearest_of_every_value(deep_model, method, lora_rank):
    budget = final_trainable(deep_model, AdapterConfig(method="lora", rank=lora_rank, targets=TARGETS))
    count, knob = count_of(deep_model, method), knob_of(method)
    found = nearest_value(count, knob, budget)
    if not knob.monotone:
        every = range(knob.minimum, knob.maximum + 1)
        assert found == min(every, key=lambda v: (abs(count(v) - budget), v))
        return

    # Scanning every value costs minutes where the knob is a vector length in the tens of thousands. With counts
    # that never fall as the knob grows, the distance to the budget falls and then rises, so the nearest value
    # (the smaller on a tie) is the one strictly nearer than the value below it and no farther than the value
    # above it, where the value above reaches the budget.
    def distance(value: int) -> int:
        return abs(count(value) - budget)

    if found > knob.minimum:
        assert distance(found - 1) > distance(found)
    if found < knob.maximum:
        assert distance(found + 1) >= distance(found)
        assert count(found) >= budget or count(found + 1) >= budget


def test_shareab_reaches_lora_exactly_at_rank_times_layers(deep_model):
    """ShareAB trains one A and one B per module type, r(d_in + d_out), where LoRA trains that per layer: at
    rank L·r it has LoRA r's count to the parameter."""
    lora = final_trainable(deep_model, AdapterConfig(method="lora", rank=2, targets=TARGETS))
    per_layer = 2 * ((HIDDEN + HIDDEN) * 2 + (HIDDEN + KV) * 2 + (HIDDEN + FFN) * 3)
    assert lora == LAYERS * per_layer == 12 * 1120
    assert nearest_value(count_of(deep_model, "shareab"), RANK, lora) == LAYERS * 2


def test_vera_rank_for_a_budget_follows_its_formula(deep_model):
    """VeRA trains d (length r) and b (length d_out) per adapted layer: 12 · Σ(d_out + r) over the seven
    projections = 12 · (288 + 7r). LoRA r=1's 12 · 560 needs 7r = 272, r = 38.9: rank 39 (12 · 561, 12 over;
    rank 38 is 72 under)."""
    lora = final_trainable(deep_model, AdapterConfig(method="lora", rank=1, targets=TARGETS))
    vera = count_of(deep_model, "vera")
    assert lora == 12 * 560 and vera(39) == 12 * (288 + 7 * 39)
    assert nearest_value(vera, RANK, lora) == 39


def test_a_budget_below_the_minimum_gives_the_minimum_and_beyond_the_maximum_the_maximum():
    knob = RANK.__class__("rank", minimum=3, maximum=100)
    assert nearest_value(lambda v: 10 * v, knob, 5) == 3
    assert nearest_value(lambda v: 10 * v, knob, 10**6) == 100
    assert nearest_value(lambda v: 10 * v, knob, 455) == 45  # 450 and 460 are as near: the smaller value


def test_with_knob_sets_a_nested_setting_on_a_copy():
    settings = {"method": "vblora", "rank": 4, "vblora": {"vector_length": 16}}
    changed = with_knob(settings, SIZE_KNOBS["vblora"], 30)
    assert changed["vblora"] == {"vector_length": 16, "num_vectors": 30}
    assert settings["vblora"] == {"vector_length": 16}
    assert with_knob(settings, RANK, 7)["rank"] == 7


def test_a_method_without_an_entry_is_sized_by_its_rank():
    assert knob_of("a-method-added-later") == RANK
