"""A tiny Llama-architecture causal LM with a BPE tokenizer trained on local GSM8K text.

Random weights, real tokenizer: for tests and benchmarks, with no hub access. pretrain.py builds the
pretrained base of the quickstart from the same config and tokenizer trainer.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sharelora_cli.core.errors import UserError
from sharelora_cli.core.paths import data_dir

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# A minimal chat template so chat-format data works with the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def gsm8k_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} not found: set SHARELORA_DATA to the folder holding gsm8k/train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f"{row['question']}\n{row['answer']}" for row in rows]


def train_tokenizer(texts: list[str], vocab_size: int, split_digits: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (lossless round trip), bos prepended like Llama's tokenizer.

    split_digits makes every digit its own token (as Llama's tokenizer does), so that numbers are
    read column by column: what lets a small model learn arithmetic.
    """
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer: PreTrainedTokenizerFast, hidden: int = 128, layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2 + hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like Llama 3
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: Path, vocab_size: int = 2048, hidden: int = 128, layers: int = 4, seed: int = 0) -> Path:
    """Write a loadable model + tokenizer directory (save_pretrained) and return its path."""
    tokenizer = train_tokenizer(gsm8k_texts(data_dir() / "gsm8k" / "train.jsonl"), vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, hidden, layers))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
