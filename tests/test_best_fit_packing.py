"""Whole-example (best-fit) packing: no example split unless longer than a block, every target trained once,
blocks as isolated as the stream packing's, and `data.packing` recipes of before still loading."""

import json
import math
from collections import Counter

import pytest
import torch
from cli_runner import assert_one_line_error, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from script_module import load_script
from test_packing import gsm8k_config, numbered, pieces
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.config.recipe import load_recipe
from sharelora_cli.core.errors import UserError
from sharelora_cli.data.data_summary import data_line
from sharelora_cli.data.examples import IGNORE_INDEX, Example, best_fit, build_splits, collate, pack, pack_best_fit
from sharelora_cli.training.loop import token_loss_sum


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@st.composite
def examples_and_block(draw) -> tuple[list[Example], int]:
    """Examples of distinct token ids (so each can be traced) with some labels masked, and a block length."""
    max_length = draw(st.integers(2, 40))
    lengths = draw(st.lists(st.integers(1, 3 * max_length), min_size=1, max_size=30))
    examples, next_id = [], 0
    for row, n in enumerate(lengths):
        ids = list(range(next_id, next_id + n))
        masked = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        examples.append(Example(ids, [IGNORE_INDEX if m else t for t, m in zip(ids, masked)], row))
        next_id += n
    return examples, max_length


def targets(example: Example) -> list[int]:
    """The tokens an example trains on: its first token never is one (nothing precedes it)."""
    return [label for label in example.labels[1:] if label != IGNORE_INDEX]


@settings(max_examples=300, deadline=None)
@given(examples_and_block())
def test_an_example_is_split_only_when_longer_than_a_block(case):
    examples, max_length = case
    blocks = pack_best_fit(examples, max_length)
    assert all(len(block.input_ids) <= max_length for block in blocks)
    placed = Counter(tuple(piece.input_ids) for block in blocks for piece in pieces(block))
    for ex in examples:
        if len(ex.input_ids) <= max_length and targets(ex):
            assert placed[tuple(ex.input_ids)] == 1, ex  # whole, in one block, once
    # Every piece is a run of consecutive tokens of one example: nothing is interleaved or reordered.
    owner = {token: ex.row for ex in examples for token in ex.input_ids}
    for ids in placed:
        assert list(ids) == list(range(ids[0], ids[0] + len(ids))) and len({owner[t] for t in ids}) == 1


@settings(max_examples=300, deadline=None)
@given(examples_and_block())
def test_every_target_token_is_trained_exactly_once(case):
    """Split pieces overlap by one token, whose target the previous piece trained: none lost, none twice."""
    examples, max_length = case
    blocks = pack_best_fit(examples, max_length)
    trained = [label for block in blocks for label in block.labels if label != IGNORE_INDEX]
    expected = [t for ex in examples for t in targets(ex)]
    assert sorted(trained) == sorted(expected)
    assert all(any(label != IGNORE_INDEX for label in block.labels) for block in blocks)


def test_a_long_example_is_cut_into_block_long_pieces_that_overlap_by_one_token():
    ex = Example(list(range(10)), list(range(10)), 0)
    blocks = pack_best_fit([ex], 4)
    assert sorted(block.input_ids for block in blocks) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert all(block.position_ids == [0, 1, 2, 3] for block in blocks)
    assert sorted(block.labels for block in blocks) == [
        [IGNORE_INDEX, 1, 2, 3],
        [IGNORE_INDEX, 4, 5, 6],
        [-100, 7, 8, 9],
    ]


def test_best_fit_puts_each_item_into_the_fullest_block_with_room():
    # Longest first: 6 -> block 0 (space 4); 5 opens block 1 (space 5); 4 fills block 0; 3 and 2 fill block 1.
    assert best_fit([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]
    # Two blocks with space 4 (the tie goes to the newer); the first 2 leaves block 1 with 2, the fuller one,
    # where the second 2 goes (first fit would put it into block 0).
    assert best_fit([6, 6, 2, 2], 10) == [[0], [1, 2, 3]]
    assert best_fit([], 10) == [] and best_fit([10, 10], 10) == [[0], [1]]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))))
def test_a_new_block_opens_only_when_no_open_block_has_room(case):
    capacity, lengths = case
    bins = best_fit(lengths, capacity)
    assert sorted(k for members in bins for k in members) == list(range(len(lengths)))
    space = [capacity - sum(lengths[k] for k in members) for members in bins]
    assert min(space, default=0) >= 0
    # Spaces only shrink, so each block's final space is below the item that opened any later block.
    for b, members in enumerate(bins):
        assert all(space[earlier] < lengths[members[0]] for earlier in range(b))


def test_block_count_against_stream_packing_on_gsm8k(tokenizer, shared_data):
    """1,000 GSM8K rows in 1,024-token blocks; stream packing's count is the fewest possible (every block full).

    A block opens only when the item that opens it fits no earlier block, so every block but the last has
    less free space than the longest example: blocks - 1 < tokens / (1024 - longest).
    """
    common = {"max_examples": 1000, "mask_prompt": False, "max_length": 1024}
    stream = build_splits(gsm8k_config(shared_data, packing="stream", **common), tokenizer, 0).train
    whole = build_splits(gsm8k_config(shared_data, packing="best_fit", **common), tokenizer, 0).train
    examples = build_splits(gsm8k_config(shared_data, **common), tokenizer, 0).train
    tokens, longest = sum(len(ex.input_ids) for ex in examples), max(len(ex.input_ids) for ex in examples)
    assert len(stream) == math.ceil(tokens / 1024)
    assert longest <= 1024 and len(stream) <= len(whole) < tokens / (1024 - longest) + 1
    assert Counter(t for b in whole for t in b.input_ids) == Counter(t for ex in examples for t in ex.input_ids)
    assert sorted(tuple(p.input_ids) for b in whole for p in pieces(b)) == sorted(
        tuple(ex.input_ids) for ex in examples
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_loss_is_the_sum_of_the_examples_losses_unpacked(attention, tokenizer, tiny_model_dir, shared_data):
    """Whole examples: the blocks' total loss is the unpacked examples' total, block by block too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    config = gsm8k_config(shared_data, max_examples=12, max_length=10_000, mask_prompt=False)
    examples = build_splits(config, tokenizer, 0).train
    # Every token a target, so that any example seeing another would change the loss; no example split.
    blocks = pack_best_fit(examples, 2 * max(len(ex.input_ids) for ex in examples))
    assert any(len(pieces(b)) > 2 for b in blocks) and len({len(b.input_ids) for b in blocks}) > 1
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        packed = token_loss_sum(model, collate(blocks, pad))
        per_block = torch.stack([token_loss_sum(model, collate([block], pad)) for block in blocks])
        alone = torch.stack([sum(token_loss_sum(model, collate([p], pad)) for p in pieces(b)) for b in blocks])
        unpacked = sum(token_loss_sum(model, collate([ex], pad)) for ex in examples)
    # float32 throughout; attention over other lengths only reorders sums, far below this tolerance.
    torch.testing.assert_close(per_block, alone, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "value, data_format, mode",
    [
        (True, "gsm8k", "best_fit"),
        (True, "alpaca", "best_fit"),
        (True, "chat", "best_fit"),
        (True, "text", "stream"),
        ("stream", "alpaca", "stream"),
        ("best_fit", "text", "best_fit"),
        (False, "alpaca", None),
    ],
)
def test_packing_true_means_the_formats_default(tmp_path, tiny_model_dir, value, data_format, mode):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"format": data_format, "packing": value}})
    )
    loaded = load_recipe(str(recipe))
    assert loaded.data.packing == value and loaded.data.packing_mode() == mode


def test_a_yaml_recipe_with_packing_true_still_loads_and_overrides_name_a_mode(tmp_path, tiny_model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  packing: yes\n")
    assert load_recipe(str(recipe)).data.packing is True
    assert load_recipe(str(recipe), ["data.packing=stream"]).data.packing_mode() == "stream"
    assert load_recipe(str(recipe), ["data.packing=off"]).data.packing is False
    error = assert_one_line_error(run_cli("show", str(recipe), "data.packing=greedy"), "data.packing")
    assert error.endswith("data.packing must be one of true, false, best_fit or stream; got 'greedy'")


@pytest.mark.parametrize("mode", ["best_fit", "stream"])
def test_with_packing_overlength_drop_and_truncate_still_apply(tokenizer, shared_data, mode):
    """Packing splits an example longer than a block only under the default data.overlength=error."""
    common = {"max_examples": 40, "mask_prompt": False}
    lengths = [len(ex.input_ids) for ex in build_splits(gsm8k_config(shared_data, **common), tokenizer, 0).train]
    assert 0 < sum(n <= 128 for n in lengths) < len(lengths)
    packed = {
        overlength: build_splits(
            gsm8k_config(shared_data, packing=mode, overlength=overlength, max_length=128, **common), tokenizer, 0
        ).train
        for overlength in ("drop", "truncate")
    }
    assert sum(len(b.input_ids) for b in packed["drop"]) == sum(n for n in lengths if n <= 128)
    assert sum(len(b.input_ids) for b in packed["truncate"]) == sum(min(n, 128) for n in lengths)


def test_stream_packing_is_todays_packing(tokenizer, shared_data):
    examples = build_splits(gsm8k_config(shared_data, max_length=10_000), tokenizer, 0).train
    streamed = build_splits(gsm8k_config(shared_data, packing="stream", max_length=128), tokenizer, 0).train
    assert [b.input_ids for b in streamed] == [b.input_ids for b in pack(examples, 128)]


def test_best_fit_packing_that_leaves_no_target_is_a_user_error(tokenizer, shared_data):
    """One-token pieces: each starts at position 0, so none is a target."""
    with pytest.raises(UserError, match="data.max_length=1 leaves no packed block"):
        build_splits(gsm8k_config(shared_data, max_examples=5, packing="best_fit", max_length=1), tokenizer, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(2, 90), min_size=1, max_size=20)))
)
def test_the_studys_count_of_examples_cut_by_stream_packing_is_packs(case):
    """scripts/packing_blocks.py counts cuts from lengths alone; pack's blocks say which examples it cut."""
    max_length, lengths = case
    examples = numbered(lengths)
    blocks = pack(examples, max_length)
    whole = {tuple(piece.input_ids) for block in blocks for piece in pieces(block)}
    cut = sum(tuple(ex.input_ids) not in whole for ex in examples)
    assert load_script("packing_blocks").cut_by_stream(lengths, max_length) == cut


def test_the_data_line_counts_the_examples_packing_split(tokenizer, shared_data):
    common = {"max_examples": 1000, "mask_prompt": False}
    unpacked = build_splits(gsm8k_config(shared_data, max_length=10_000, **common), tokenizer, 0).train
    longer = sorted(n for n in (len(ex.input_ids) for ex in unpacked) if n > 512)
    assert longer  # GSM8K's first 1,000 rows hold a few over 512 tiny-tokenizer tokens
    config = gsm8k_config(shared_data, packing=True, max_length=512, **common)
    splits = build_splits(config, tokenizer, 0)
    assert sorted(splits.stats.split_lengths) == longer
    line = data_line(splits.stats, config, 10, 4, len(splits.train))
    assert (
        f"({len(longer)} split across blocks: longer than data.max_length=512, {longer[0]}-{longer[-1]} tokens)" in line
    )
    assert f"packed (best_fit) into {len(splits.train)} training blocks" in line
