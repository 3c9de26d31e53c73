"""LoRA vs ShareA vs ASLoRA vs MiSS: GSM8K validation loss after the same steps on the tiny offline model.

    .venv/bin/python scripts/compare_methods.py --out runs/compare-methods [--steps 60]

Every method trains from the same seed on the same batches (same rank, targets, lr and
schedule); the table gives each one's trainable parameters at the end of training (ASLoRA's
after its merges) and its validation loss on the same fixed validation examples. Results
are recorded in docs/aslora.md and docs/benchmarks.md.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sharelora_cli.config.recipe import validate
from sharelora_cli.core.paths import data_dir
from sharelora_cli.training.loop import train

# label -> adapter section; ASLoRA twice: the recipe default (target_ratio 0.25, one B per type
# on this 4-layer model) and two B's per type.
RUNS = {
    "lora": {"method": "lora"},
    "sharea": {"method": "sharea"},
    "aslora": {"method": "aslora"},
    "aslora K=2": {"method": "aslora", "aslora": {"target_groups": 2}},
    "miss": {"method": "miss"},
}


def recipe(model: str, adapter: dict, steps: int, output_dir: Path):
    return validate(
        {
            "model": {"name_or_path": model},
            "adapter": {
                "rank": 8,
                "alpha": 16.0,
                "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                **adapter,
            },
            "data": {
                "path": str(data_dir() / "gsm8k" / "train.jsonl"),
                "max_length": 256,
                "overlength": "drop",
                "max_examples": 1000,
                "validation_fraction": 0.1,
            },
            "train": {
                "max_steps": steps,
                "batch_size": 4,
                "lr": 3e-3,
                "warmup_steps": 5,
                "scheduler": "cosine",
                "log_every": 10,
                "eval_every": steps,
                "eval_batches": 16,
                "checkpoint_every": steps,
            },
            "output_dir": str(output_dir),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="new directory; one run per method inside")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="artifacts/tiny-llama")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new directory")
    rows = {}
    for label, adapter in RUNS.items():
        summary = train(recipe(args.model, adapter, args.steps, args.out / label.replace(" ", "-").replace("=", "")))
        rows[label] = {
            "trainable": summary.trainable_parameters,
            "val_loss": summary.final_val_loss,
            "train_loss": summary.final_loss,
            "seconds": summary.seconds,
        }
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lora = rows["lora"]["trainable"]
    print(f"| method | trainable | vs LoRA | val loss after {args.steps} steps | train loss (last step) | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, row in rows.items():
        print(
            f"| {label} | {row['trainable']:,} | {row['trainable'] / lora:.1%} | {row['val_loss']:.4f} | "
            f"{row['train_loss']:.4f} | {row['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
