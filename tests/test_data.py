"""Data pipeline: formats, loss masks, splits, sampler, and one-line errors for bad data."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from sharelora_cli.config.recipe import DataConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.data.examples import IGNORE_INDEX, StepSampler, build_splits, collate, load_rows, pack


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gsm8k_prompt_is_masked_and_answer_is_trained(tokenizer, shared_data):
    cfg = DataConfig(
        path=str(shared_data / "gsm8k" / "train.jsonl"), max_examples=50, validation_fraction=0.0, overlength="drop"
    )
    splits = build_splits(cfg, tokenizer, seed=0)
    row = load_rows(cfg)[0]
    prompt_ids = tokenizer(f"Question: {row['question']}\nAnswer:")["input_ids"]
    example = next(ex for ex in splits.train if ex.input_ids[: len(prompt_ids)] == prompt_ids)
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True)
    assert answer.strip() == row["answer"].strip()
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_unmasked_prompt_trains_on_every_token(tokenizer, shared_data):
    cfg = DataConfig(
        path=str(shared_data / "gsm8k" / "train.jsonl"), max_examples=5, validation_fraction=0.0, mask_prompt=False
    )
    for example in build_splits(cfg, tokenizer, seed=0).train:
        assert example.labels == example.input_ids


def test_alpaca_chat_and_text_formats(tmp_path, tokenizer):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 4)
    chat = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}] * 4,
    )
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain text to model"}] * 4)
    for path, fmt, trained in (
        (alpaca, "alpaca", "5"),
        (chat, "chat", "hello there"),
        (text, "text", "plain text to model"),
    ):
        example = build_splits(DataConfig(path=str(path), format=fmt, validation_fraction=0.0), tokenizer, 0).train[0]
        decoded = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True)
        assert decoded.strip() == trained, fmt


def test_validation_split_is_deterministic_and_disjoint(tokenizer, shared_data):
    cfg = DataConfig(
        path=str(shared_data / "gsm8k" / "train.jsonl"), max_examples=200, validation_fraction=0.1, overlength="drop"
    )
    first, again, other = (build_splits(cfg, tokenizer, seed) for seed in (1, 1, 2))
    ids = lambda examples: [tuple(ex.input_ids) for ex in examples]  # noqa: E731
    assert ids(first.validation) == ids(again.validation) and ids(first.validation) != ids(other.validation)
    assert len(first.validation) == 20 and not set(ids(first.validation)) & set(ids(first.train))


def test_overlength_truncate_and_drop(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 400}, {"text": "short"}])
    truncated = build_splits(
        DataConfig(path=str(path), format="text", max_length=32, overlength="truncate", validation_fraction=0.0),
        tokenizer,
        0,
    )
    assert sorted(len(ex.input_ids) for ex in truncated.train)[-1] == 32
    dropped = build_splits(
        DataConfig(path=str(path), format="text", max_length=32, overlength="drop", validation_fraction=0.0),
        tokenizer,
        0,
    )
    assert len(dropped.train) == 1


def test_packing_fills_blocks_of_max_length(tokenizer, shared_data):
    cfg = DataConfig(
        path=str(shared_data / "gsm8k" / "train.jsonl"),
        max_examples=40,
        validation_fraction=0.0,
        packing="stream",
        max_length=128,
    )
    splits = build_splits(cfg, tokenizer, 0)
    assert splits.train and all(len(ex.input_ids) == 128 == len(ex.labels) for ex in splits.train[:-1])
    assert 0 < len(splits.train[-1].input_ids) <= 128


def test_collate_pads_right_and_masks_padding():
    from sharelora_cli.data.examples import Example

    batch = collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


def test_collate_gives_packed_blocks_their_position_ids_and_padding_its_own():
    from sharelora_cli.data.examples import Example

    blocks = pack([Example([1, 2, 3], [1, 2, 3]), Example([4, 5, 6, 7], [4, 5, 6, 7])], 5)
    batch = collate(blocks, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5], [IGNORE_INDEX, 7] + [IGNORE_INDEX] * 3]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


def test_sampler_splits_the_same_global_batch_across_processes_and_accumulation():
    one = StepSampler(50, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=3)
    two = [StepSampler(50, batch_size=2, grad_accum=2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    for step in range(20):
        single = sorted(i for micro in one.micro_batches(step) for i in micro)
        split = sorted(i for s in two for micro in s.micro_batches(step) for i in micro)
        assert single == split and len(single) == 8
    seen = [i for step in range(7) for micro in one.micro_batches(step) for i in micro]
    assert sorted(seen[:50]) == list(range(50))


def run_train_with_data(tmp_path, tiny_model_dir, data_path, *extra):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "data": {"path": str(data_path), "max_length": 64},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sharelora_cli", "train", str(recipe), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"question": "q?"}], ["row 1", "'answer'", "bad.jsonl"]),
        ([], ["bad.jsonl", "empty"]),
        ([{"question": "How many? " * 100, "answer": "#### 3"}], ["bad.jsonl", "row 1", "data.max_length=64"]),
    ],
    ids=["missing-field", "empty-file", "too-long"],
)
def test_bad_data_stops_before_training_with_one_line(tmp_path, tiny_model_dir, rows, expected):
    result = run_train_with_data(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "bad.jsonl", rows))
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: "), result.stderr
    assert all(part in message[0] for part in expected), message[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_file_is_named(tmp_path, tiny_model_dir):
    result = run_train_with_data(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl")
    assert result.returncode == 2 and "nope.jsonl not found" in result.stderr and result.stderr.count("\n") == 1


def test_unreadable_rows_are_reported(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{not json\n')
    with pytest.raises(UserError, match="broken.jsonl"):
        load_rows(DataConfig(path=str(path)))
