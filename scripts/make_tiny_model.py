"""Build the tiny offline Llama models: random weights (tests, benchmarks) or pretrained on synthetic arithmetic.

    python scripts/make_tiny_model.py [OUT_DIR]              # random weights, BPE trained on GSM8K (artifacts/tiny-llama)
    python scripts/make_tiny_model.py --pretrain [OUT_DIR] [--tasks DIR] [--seed N] [--steps N] [--layers N] [--hidden N]
                                                             # pretrained base (artifacts/tiny-llama-arith) and the
                                                             # fine-tuning task's train/test files (artifacts/synthetic-tasks)

--pretrain trains every weight of the tiny Llama on the pretraining skills of sharelora_cli/data/synthetic_tasks.py
(a few minutes on 2 CPU cores, the same weights for the same seed) and writes each skill's held-out problems in
GSM8K folder layout, TASKS/<skill>/{train,test}.jsonl; TASKS/story is the held-back skill to fine-tune on.
--layers builds a deeper base for the depth study (scripts/method_study.py --depth-study), where sharing across
layers has many layers to share over:

    python scripts/make_tiny_model.py --pretrain artifacts/tiny-llama-arith-deep --layers 12 --hidden 64
"""

import argparse
import sys
from pathlib import Path

from sharelora_cli.core.errors import UserError
from sharelora_cli.data.synthetic_tasks import write_tasks
from sharelora_cli.models.pretrain import PretrainConfig, pretrain
from sharelora_cli.models.tiny_model import build_tiny_model

RANDOM_DIR, PRETRAINED_DIR, TASKS_DIR = (
    "artifacts/tiny-llama",
    "artifacts/tiny-llama-arith",
    "artifacts/synthetic-tasks",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", nargs="?", type=Path, help=f"model directory [default: {RANDOM_DIR}, with --pretrain {PRETRAINED_DIR}]"
    )
    parser.add_argument(
        "--pretrain", action="store_true", help="pretrain on synthetic arithmetic instead of random weights"
    )
    parser.add_argument(
        "--tasks",
        type=Path,
        default=Path(TASKS_DIR),
        help=f"with --pretrain: where the task folders go [default: {TASKS_DIR}]",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=PretrainConfig.seed,
        help=f"with --pretrain: seed of corpus, tokenizer, weights and tasks [default: {PretrainConfig.seed}]",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=PretrainConfig.steps,
        help=f"with --pretrain: optimizer steps of {PretrainConfig.batch_size} rows [default: {PretrainConfig.steps}]",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=PretrainConfig.layers,
        help=f"with --pretrain: transformer blocks [default: {PretrainConfig.layers}]",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=PretrainConfig.hidden,
        help=f"with --pretrain: hidden size, a multiple of 8 [default: {PretrainConfig.hidden}]",
    )
    args = parser.parse_args()
    if not args.pretrain:
        print(f"tiny model written to {build_tiny_model(args.out or Path(RANDOM_DIR))}")
        return
    for flag, value in (("--steps", args.steps), ("--layers", args.layers), ("--hidden", args.hidden)):
        if value <= 0:
            parser.error(f"{flag} must be a positive integer, got {value}")
    if args.hidden % 8:
        # 4 attention heads, each of even width for the rotary embedding.
        parser.error(f"--hidden must be a multiple of 8, got {args.hidden}")
    print(f"synthetic tasks written to {write_tasks(args.tasks, args.seed)}")
    cfg = PretrainConfig(seed=args.seed, steps=args.steps, layers=args.layers, hidden=args.hidden)
    print(f"pretrained tiny model written to {pretrain(args.out or Path(PRETRAINED_DIR), cfg)}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
