"""Training labels are the answer's tokens as the whole text tokenizes, for byte-level BPE and SentencePiece alike.

Tokenizing prompt and answer apart can change the tokens at the join: SentencePiece marks the start
of the separately tokenized answer as a word start ("▁5"), which the whole text ("...:\\n5") has not.
"""

import json

import pytest
from sentencepiece_tokenizer import build_sentencepiece_tokenizer
from transformers import AutoTokenizer, ByT5Tokenizer

from sharelora_cli.config.recipe import DataConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.data.examples import IGNORE_INDEX, build_splits
from sharelora_cli.models.tiny_model import gsm8k_texts

CHAT = [
    {"role": "user", "content": "How many legs do 3 spiders have?"},
    {"role": "assistant", "content": "Each has 8, so 3 * 8 = 24."},
    {"role": "user", "content": "And 2 more?"},
    {"role": "assistant", "content": "24 + 16 = 40 legs."},
]
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a prime above 10.", "input": "", "output": "11 is prime."},
    {"instruction": "Say it in words.", "input": "", "output": " seven (with a leading space)"},
]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tokenizer(request, tiny_model_dir, shared_data, tmp_path_factory):
    if request.param == "bpe":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = gsm8k_texts(shared_data / "gsm8k" / "train.jsonl")
    return build_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"), texts)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = [*runs, current], []
    return runs


def check(example, tokenizer, text: str, answers: list[str], special_tokens: bool):
    """Inputs are the whole text's tokens; trained tokens are those tokens and decode to exactly the answers."""
    whole = tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
    assert example.input_ids[: len(whole)] == whole
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))
    decoded = [tokenizer.decode(run).strip() for run in labelled_runs(example.labels)]
    assert decoded == [answer.strip() for answer in answers]


def test_gsm8k_labels_are_the_answer_tokens_of_the_whole_text(tokenizer, shared_data):
    cfg = DataConfig(
        path=str(shared_data / "gsm8k" / "train.jsonl"), max_examples=50, validation_fraction=0.0, max_length=10_000
    )
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:50]]
    for example in build_splits(cfg, tokenizer, 0).train:
        row = rows[example.row]
        check(
            example,
            tokenizer,
            f"Question: {row['question']}\nAnswer: {row['answer']}",
            [row["answer"] + tokenizer.eos_token],
            True,
        )
        assert example.input_ids[-1] == tokenizer.eos_token_id


def test_alpaca_labels_are_the_answer_tokens_of_the_whole_text(tokenizer, tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "a.jsonl", ALPACA), format="alpaca", validation_fraction=0.0)
    for example in build_splits(cfg, tokenizer, 0).train:
        row = ALPACA[example.row]
        extra = f"### Input:\n{row['input']}\n\n" if row["input"] else ""
        text = f"### Instruction:\n{row['instruction']}\n\n{extra}### Response:\n{row['output']}"
        check(example, tokenizer, text, [row["output"] + tokenizer.eos_token], True)


def test_chat_labels_are_each_assistant_turn_of_the_whole_text(tokenizer, tmp_path):
    cfg = DataConfig(
        path=write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), format="chat", validation_fraction=0.0
    )
    example = build_splits(cfg, tokenizer, 0).train[0]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    eos = tokenizer.eos_token
    check(example, tokenizer, text, [f"{CHAT[1]['content']}{eos}", f"{CHAT[3]['content']}{eos}"], False)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_mask_prompt_with_a_slow_tokenizer_is_a_user_error(tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "a.jsonl", ALPACA), format="alpaca", validation_fraction=0.0)
    with pytest.raises(UserError, match="data.mask_prompt needs a fast tokenizer"):
        build_splits(cfg, ByT5Tokenizer(), 0)
    unmasked = build_splits(cfg.model_copy(update={"mask_prompt": False}), ByT5Tokenizer(), 0).train
    assert all(ex.labels == ex.input_ids for ex in unmasked)
