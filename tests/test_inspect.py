"""Trainable-parameter counts equal the methods.md formulas, for the tiny model and for real architectures."""

import json

import pytest
from cli_runner import run_cli
from reference import METHODS, TINY_BANK, adapter_config, llama_module_types, trainable_count
from tiny_architectures import LLAMA_TARGETS

from sharelora_cli.adapters.inject import inject_adapter, planned_trainable
from sharelora_cli.adapters.param_counts import count_methods
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.models.loading import build_on_meta, load_config

# The worked counts table of methods.md, rows: LLaMA-7B r=64 all seven, LLaMA-7B r=8 q v, LLaMA-13B r=64 all seven.
LLAMA7B_R64_ALL = {"lora": 159907840, "sharea": 89309184, "shareb": 75595776, "shareab": 4997120, "miss": 87031808}
LLAMA7B_R8_QV = {"lora": 4194304, "sharea": 2162688, "shareb": 2162688, "shareab": 131072, "miss": 2097152}
LLAMA13B_R64_ALL = {"lora": 250347520, "sharea": 139165696, "shareb": 117440512, "shareab": 6258688, "miss": 136314880}


def counts_by_method(model_name: str, rank: int, targets: list[str]) -> dict[str, int]:
    rows = count_methods(model_name, AdapterConfig(rank=rank, targets=targets))
    return {row.method: row.trainable for row in rows if row.method in LLAMA7B_R64_ALL}


def formula_counts(
    hidden: int,
    ffn: int,
    layers: int,
    kv_dim: int,
    rank: int,
    targets: list[str],
    methods=tuple(LLAMA7B_R64_ALL),
    bank=(256, 256),
) -> dict[str, int]:
    module_types = llama_module_types(hidden, ffn, layers, kv_dim, targets)
    return {method: trainable_count(method, rank, module_types, bank) for method in methods}


@pytest.mark.parametrize("rank", [8, 12])
@pytest.mark.parametrize("method", METHODS)
def test_tiny_model_trainable_count_matches_formula(tiny_model, method, rank):
    c = tiny_model.config
    kv_dim = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    bank = (TINY_BANK["num_vectors"], TINY_BANK["vector_length"])
    expected = formula_counts(
        c.hidden_size, c.intermediate_size, c.num_hidden_layers, kv_dim, rank, LLAMA_TARGETS, METHODS, bank
    )
    config = adapter_config(method, rank=rank, targets=LLAMA_TARGETS)
    planned = planned_trainable(tiny_model, config)
    adapter = inject_adapter(tiny_model, config)
    in_model = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    assert adapter.num_trainable() == planned == in_model == expected[method]


def test_formulas_reproduce_methods_md_table():
    assert formula_counts(4096, 11008, 32, 4096, 64, LLAMA_TARGETS) == LLAMA7B_R64_ALL
    assert formula_counts(4096, 11008, 32, 4096, 8, ["q_proj", "v_proj"]) == LLAMA7B_R8_QV
    assert formula_counts(5120, 13824, 40, 5120, 64, LLAMA_TARGETS) == LLAMA13B_R64_ALL


def test_inspect_cli_prints_llama7b_counts_from_methods_md():
    result = run_cli("inspect", "--model", "llama-7b", "--rank", "64", "--targets", ",".join(LLAMA_TARGETS), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert {method: printed[method] for method in LLAMA7B_R64_ALL} == LLAMA7B_R64_ALL


def test_llama7b_rank8_query_value_counts():
    assert counts_by_method("llama-7b", 8, ["q_proj", "v_proj"]) == LLAMA7B_R8_QV


def test_llama13b_rank64_all_targets_counts():
    assert counts_by_method("llama-13b", 64, LLAMA_TARGETS) == LLAMA13B_R64_ALL


def test_sharea_and_shareab_reductions_match_the_abstract():
    rows = {row.method: row for row in count_methods("llama-7b", AdapterConfig(rank=64, targets=LLAMA_TARGETS))}
    assert round(rows["sharea"].reduction, 3) == 0.441
    assert round(rows["shareab"].reduction, 3) == 0.969


def test_llama3_8b_grouped_query_key_value_are_1024_wide():
    model = build_on_meta(load_config("llama3-8b"))
    attention = model.get_submodule("model.layers.0.self_attn")
    assert (attention.k_proj.out_features, attention.v_proj.out_features, attention.q_proj.out_features) == (
        1024,
        1024,
        4096,
    )
    assert counts_by_method("llama3-8b", 16, LLAMA_TARGETS) == formula_counts(4096, 14336, 32, 1024, 16, LLAMA_TARGETS)


def test_inspect_cli_prints_llama7b_counts_of_vera_tied_lora_and_vblora():
    """LLaMA-7B (d = 4096, ffn = 11008, L = 32), r = 64, all seven projections; PEFT's VB-LoRA bank defaults.

    Per layer, d_out: q k v o down 4096 each, gate up 11008 each: 5·4096 + 2·11008 = 42,496.
    Per layer, d_in + d_out: q k v o 8192 each, gate up down 15104 each: 4·8192 + 3·15104 = 78,080.
    VeRA, r + d_out per module (the pair is frozen): 32 · (7·64 + 42,496) = 32 · 42,944 = 1,374,208.
    Tied-LoRA, A B u v trained: one A and B per type, r·Σ(d_in + d_out) = 64 · 78,080 = 4,997,120 (ShareAB's count),
      plus u and v per module, 1,374,208 as VeRA's vectors: 6,371,328.
    VB-LoRA, 256 vectors of length 256: bank 256·256 = 65,536; logits per module 256·r·(d_in + d_out)/256
      = 64·(d_in + d_out): 32 · 64 · 78,080 = 159,907,840 (LoRA's count, as num_vectors = vector_length);
      159,907,840 + 65,536 = 159,973,376.
    """
    expected = {"vera": 1_374_208, "tied-lora": 6_371_328, "vblora": 159_973_376}
    result = run_cli("inspect", "--model", "llama-7b", "--rank", "64", "--targets", ",".join(LLAMA_TARGETS), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert {method: printed[method] for method in expected} == expected
    module_types = llama_module_types(4096, 11008, 32, 4096, LLAMA_TARGETS)
    assert {method: trainable_count(method, 64, module_types) for method in expected} == expected


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        (["u", "v"], 1_374_208),
        (["A", "B"], 4_997_120),
        (["B", "u", "v"], 64 * 42_496 + 1_374_208),
        (["A", "B", "v"], 4_997_120 + 32 * 42_496),
    ],
)
def test_llama7b_tied_lora_variant_counts(train, expected):
    """Tied-LoRA variants on LLaMA-7B r = 64, all seven projections (sums from the test above):
    u and v alone 32·(7·64 + 42,496) = 1,374,208; A and B alone 64·78,080 = 4,997,120;
    B, u, v: B is r·Σ d_out over the types = 64·42,496 = 2,719,744, plus 1,374,208 = 4,093,952;
    A, B, v: 4,997,120 + v's 32·42,496 = 1,359,872, so 6,356,992."""
    config = AdapterConfig(method="tied-lora", rank=64, targets=LLAMA_TARGETS, tied_lora={"train": train})
    rows = {row.method: row.trainable for row in count_methods("llama-7b", config)}
    assert rows["tied-lora"] == expected


def test_inspect_leaves_out_a_method_whose_settings_do_not_fit_and_says_why(tiny_model_dir):
    result = run_cli("inspect", "--model", str(tiny_model_dir), "--rank", "8", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert "vblora" not in printed and {"lora", "vera", "tied-lora"} <= set(printed)
    assert "note: vblora not counted: adapter.vblora.vector_length=256" in result.stderr
    table = run_cli("inspect", "--model", str(tiny_model_dir), "--rank", "8")
    assert table.returncode == 0 and "vector_length=256" in table.stdout
