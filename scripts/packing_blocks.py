"""Blocks that best_fit and stream packing make of the same examples: the price of never cutting an example.

    .venv/bin/python scripts/packing_blocks.py [--model artifacts/tiny-llama] [--lengths 512,1024,2048]

Packs every GSM8K training row ($SHARELORA_DATA/gsm8k/train.jsonl, prompts masked as data.packing trains them)
both ways and prints, per block length, the blocks, how full they are on average and how many examples a
block boundary cuts (stream) or how many examples are longer than a block (best_fit's only splits).
Block counts depend only on the tokenizer, so they are the same on every machine.
"""

import argparse
import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer

from sharelora_cli.config.recipe import DataConfig
from sharelora_cli.core.paths import data_dir
from sharelora_cli.data.examples import build_splits


def cut_by_stream(lengths: list[int], max_length: int) -> int:
    """Examples that a multiple of max_length falls strictly inside of, in the concatenation."""
    ends = list(itertools.accumulate(lengths))
    # A multiple m*max_length with start < m*max_length < end, i.e. (end - 1) // max_length > start // max_length.
    return sum(1 for start, end in zip([0, *ends], ends) if (end - 1) // max_length > start // max_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/tiny-llama", help="model directory whose tokenizer is used")
    parser.add_argument("--lengths", default="512,1024,2048", help="comma-separated data.max_length values")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    path = str(data_dir() / "gsm8k" / "train.jsonl")
    examples = build_splits(DataConfig(path=path, max_length=10**9, validation_fraction=0.0), tokenizer, 0).train
    lengths = [len(ex.input_ids) for ex in examples]
    print(f"{len(examples)} examples, {sum(lengths)} tokens, longest {max(lengths)}")
    print("max_length  stream blocks  fill    examples cut  best_fit blocks  fill    examples split  extra blocks")
    for max_length in map(int, args.lengths.split(",")):
        row = []
        for mode in ("stream", "best_fit"):
            cfg = DataConfig(path=path, max_length=max_length, validation_fraction=0.0, packing=mode)
            blocks = build_splits(cfg, tokenizer, 0).train
            fill = sum(len(b.input_ids) for b in blocks) / (len(blocks) * max_length)
            row.append((len(blocks), fill))
        (stream, stream_fill), (whole, whole_fill) = row
        longer = sum(n > max_length for n in lengths)
        print(
            f"{max_length:>10}  {stream:>13}  {stream_fill:.4f}  {cut_by_stream(lengths, max_length):>12}  "
            f"{whole:>15}  {whole_fill:.4f}  {longer:>14}  {(whole - stream) / stream:+.1%}"
        )


if __name__ == "__main__":
    main()
