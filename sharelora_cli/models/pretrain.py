"""Pretrain the tiny Llama from scratch (all weights) on synthetic_tasks' pretraining skills, on CPU, in minutes.

This is the offline stand-in for a pretrained base: a model that has learned something an adapter can
build on. Every random choice (corpus, tokenizer, initial weights, batch order) follows the seed, so
the same seed gives the same weights on the same machine. Each step takes a fresh batch of the
generated corpus (no row is seen twice), and the loss covers question and answer like any LM corpus.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from sharelora_cli.core.lr_schedule import make_scheduler
from sharelora_cli.data.examples import Example, collate
from sharelora_cli.data.synthetic_tasks import PRETRAINING_MIX, rows
from sharelora_cli.models.tiny_model import tiny_config, train_tokenizer

# The corpus repeats a small vocabulary, which its first rows already hold.
TOKENIZER_ROWS = 5000
# Written last, so a directory that has it holds a finished model (scripts/quickstart.sh checks for it).
SUMMARY_FILE = "pretraining.json"


@dataclass(frozen=True)
class PretrainConfig:
    """The defaults build artifacts/tiny-llama-arith (0.4M parameters).

    Chosen on held-out problems of each skill, 1000 steps of 48: hidden 96 and 3 layers got 97% of the
    sums right (compare and recall 100%), in 40% less compute than hidden 128 (96%); 4 layers got 80%.
    Packing examples into blocks or batching them by length saved padding but cost most of the arithmetic.
    """

    seed: int = 0
    steps: int = 1000
    batch_size: int = 48
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    hidden: int = 96
    layers: int = 3
    vocab_size: int = 512
    max_length: int = 96
    mix: dict[str, float] = field(default_factory=lambda: dict(PRETRAINING_MIX))


def pretrain(out_dir: Path, cfg: PretrainConfig = PretrainConfig()) -> Path:
    """Train a tiny Llama and its tokenizer from scratch; save_pretrained to out_dir with a summary."""
    started = time.perf_counter()
    corpus = rows(cfg.mix, cfg.steps * cfg.batch_size, cfg.seed)
    tokenizer = train_tokenizer(
        [training_text(row) for row in corpus[:TOKENIZER_ROWS]], cfg.vocab_size, split_digits=True
    )
    examples = tokenize(corpus, tokenizer, cfg)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, cfg.hidden, cfg.layers))
    losses = train_all_weights(model, examples, tokenizer.pad_token_id, cfg)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "config": asdict(cfg),
        "parameters": model.num_parameters(),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir


def training_text(row: dict) -> str:
    """A row as `sharelora train` formats data.format=gsm8k (data.py), whole: the base learns question and answer."""
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def tokenize(corpus: list[dict], tokenizer, cfg: PretrainConfig) -> list[Example]:
    """bos + text + eos per row, tokenized in one batch (per-row calls took a tenth of the pretraining time)."""
    ids = tokenizer([training_text(row) for row in corpus])["input_ids"]
    too_long = next((i for i, row in enumerate(ids) if len(row) + 1 > cfg.max_length), None)
    if too_long is not None:
        raise ValueError(f"pretraining row {too_long} is longer than max_length={cfg.max_length} tokens")
    return [Example([*row, tokenizer.eos_token_id], [*row, tokenizer.eos_token_id]) for row in ids]


def train_all_weights(model: LlamaForCausalLM, examples: list, pad_id: int, cfg: PretrainConfig) -> list[float]:
    """AdamW over every weight, warm-up then cosine decay; one fresh batch per step. Returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = make_scheduler("cosine", optimizer, cfg.warmup_steps, cfg.steps)
    losses = []
    with tqdm(range(cfg.steps), desc="pretrain", disable=None) as progress:
        for step in progress:
            batch = collate(examples[step * cfg.batch_size : (step + 1) * cfg.batch_size], pad_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
