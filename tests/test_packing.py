"""Stream packing (`data.packing: stream`): every token kept, no block without targets, validation bounded, and packed examples isolated."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_architectures import GPT2_TARGETS
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sharelora_cli.config.recipe import DataConfig, load_recipe
from sharelora_cli.core.errors import UserError
from sharelora_cli.data.examples import IGNORE_INDEX, Example, build_splits, collate, pack
from sharelora_cli.training.loop import token_loss_sum, train


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def gsm8k_config(shared_data: Path, **overrides) -> DataConfig:
    return DataConfig(
        path=str(shared_data / "gsm8k" / "train.jsonl"), **{"max_examples": 60, "validation_fraction": 0.0, **overrides}
    )


def numbered(lengths: list[int]) -> list[Example]:
    """Examples of consecutive token ids, all trained on, so every token can be traced."""
    examples, next_id = [], 0
    for row, n in enumerate(lengths):
        ids = list(range(next_id, next_id + n))
        examples.append(Example(ids, list(ids), row))
        next_id += n
    return examples


@pytest.mark.parametrize(
    "lengths, max_length, sizes", [([100], 64, [64, 36]), ([60], 64, [60]), ([30, 30, 30], 64, [64, 26])]
)
def test_packing_keeps_the_last_partial_block(lengths, max_length, sizes):
    examples = numbered(lengths)
    blocks = pack(examples, max_length)
    assert [len(b.input_ids) for b in blocks] == sizes
    assert [t for b in blocks for t in b.input_ids] == [t for ex in examples for t in ex.input_ids]


def test_block_positions_restart_at_each_example_and_its_first_token_is_no_target():
    blocks = pack(numbered([3, 5, 4]), 8)
    assert [b.position_ids for b in blocks] == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3]]
    assert [b.labels for b in blocks] == [[IGNORE_INDEX, 1, 2, IGNORE_INDEX, 4, 5, 6, 7], [IGNORE_INDEX, 9, 10, 11]]
    assert [b.row for b in blocks] == [0, 2]
    # An example cut by a block boundary continues as a piece of its own in the next block.
    cut = pack(numbered([6, 4]), 4)
    assert [b.position_ids for b in cut] == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1]]
    assert [b.row for b in cut] == [0, 0, 1]


def test_packing_keeps_every_token_of_real_data(tokenizer, shared_data):
    unpacked = build_splits(
        gsm8k_config(shared_data, mask_prompt=False, overlength="truncate", max_length=10_000), tokenizer, 0
    )
    packed = build_splits(gsm8k_config(shared_data, mask_prompt=False, packing="stream", max_length=128), tokenizer, 0)
    assert [t for b in packed.train for t in b.input_ids] == [t for ex in unpacked.train for t in ex.input_ids]
    assert all(len(b.input_ids) == 128 for b in packed.train[:-1]) and 0 < len(packed.train[-1].input_ids) <= 128


def test_blocks_without_targets_are_dropped_and_no_target_is_lost(tokenizer, shared_data):
    """Long masked prompts cut into short blocks leave blocks of prompt only: they carry no signal and go."""
    examples = build_splits(gsm8k_config(shared_data, max_length=10_000), tokenizer, 0).train
    labels = [label for ex in examples for label in ex.labels]
    assert any(all(label == IGNORE_INDEX for label in labels[i : i + 16]) for i in range(0, len(labels), 16))
    blocks = build_splits(gsm8k_config(shared_data, packing="stream", max_length=16), tokenizer, 0).train
    assert all(any(label != IGNORE_INDEX for label in block.labels) for block in blocks)
    # Every target survives except where a piece starts (an example's first token, or a block's first).
    starts = {0}
    for ex in examples[:-1]:
        starts.add(max(starts) + len(ex.input_ids))
    kept = [label for i, label in enumerate(labels) if label != IGNORE_INDEX and i not in starts and i % 16]
    assert [label for block in blocks for label in block.labels if label != IGNORE_INDEX] == kept


def test_packing_that_leaves_no_target_is_a_user_error(tokenizer, shared_data):
    """One-token blocks: each token starts a piece of its own, so none is a target."""
    with pytest.raises(UserError, match="data.max_length=1 leaves no packed block"):
        build_splits(gsm8k_config(shared_data, max_examples=5, packing="stream", max_length=1), tokenizer, 0)


def test_validation_is_packed_within_max_length(tokenizer, shared_data):
    common = {"max_examples": 200, "validation_fraction": 0.2, "mask_prompt": False}
    splits = build_splits(gsm8k_config(shared_data, packing="stream", max_length=64, **common), tokenizer, 0)
    unpacked = build_splits(gsm8k_config(shared_data, max_length=10_000, **common), tokenizer, 0)
    assert max(len(ex.input_ids) for ex in unpacked.validation) > 64
    assert splits.validation and max(len(b.input_ids) for b in splits.validation) <= 64
    assert all(b.position_ids is not None for b in splits.validation)
    # The same validation examples as unpacked, cut into blocks.
    assert [t for b in splits.validation for t in b.input_ids] == [
        t for ex in unpacked.validation for t in ex.input_ids
    ]


def tiny_gpt2_for(tokenizer, positions: int = 128) -> GPT2LMHeadModel:
    """GPT-2 with learned position embeddings (n_positions of them) over the tiny tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval()


def pieces(block: Example) -> list[Example]:
    """The block's packed examples (or parts of examples), each as an example of its own."""
    starts = [i for i, position in enumerate(block.position_ids) if position == 0] + [len(block.input_ids)]
    return [Example(block.input_ids[a:b], block.labels[a:b]) for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_packed_block_loss_is_the_sum_of_its_examples_alone(
    architecture, attention, tokenizer, tiny_model_dir, shared_data
):
    if architecture == "llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    else:
        model = tiny_gpt2_for(tokenizer, positions=256)
        model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    # Every token a target, so that any example seeing another would change the loss.
    examples = build_splits(
        gsm8k_config(shared_data, max_examples=8, max_length=10_000, mask_prompt=False), tokenizer, 0
    ).train
    blocks = pack(examples, 256)
    assert len(blocks[-1].input_ids) < 256 and any(len(pieces(b)) > 2 for b in blocks)  # padding, and shared blocks
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        packed = token_loss_sum(model, collate(blocks, pad))
        per_block = [token_loss_sum(model, collate([block], pad)) for block in blocks]
        alone = [sum(token_loss_sum(model, collate([piece], pad)) for piece in pieces(block)) for block in blocks]
    # float32 throughout; attention over other lengths only reorders sums, far below this tolerance.
    torch.testing.assert_close(torch.stack(per_block), torch.stack(alone), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed, sum(alone), rtol=1e-5, atol=1e-4)


def test_packed_training_on_long_prompts_has_finite_losses_within_learned_positions(tmp_path, tokenizer, shared_data):
    """The issue's reproduction: tiny GPT-2 with 128 learned positions, max_length=64, ~300-token questions.

    Before, blocks cut from inside a prompt made a NaN loss and the unpacked validation ran past position 128.
    """
    model_dir = tmp_path / "gpt2"
    tiny_gpt2_for(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:60]]
    long_rows = [
        {"question": " ".join(r["question"] for r in rows[i : i + 4]), "answer": rows[i]["answer"]}
        for i in range(0, 60, 3)
    ]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in long_rows))
    assert max(len(tokenizer(r["question"])["input_ids"]) for r in long_rows) > 200
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"method": "lora", "rank": 4, "alpha": 8, "targets": GPT2_TARGETS},
        "data": {"path": str(data), "max_length": 64, "packing": True, "validation_fraction": 0.1},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 2, "checkpoint_every": 100},
        "output_dir": str(tmp_path / "run"),
    }))  # fmt: skip
    train(load_recipe(str(recipe)))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert [math.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m] == [True, True]
