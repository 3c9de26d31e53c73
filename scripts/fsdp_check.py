"""FSDP2 against one process, for every method: the same 10 steps on the same global batch.

One process trains each method with batch_size 2 and grad_accum 2; then one launch of 2 gloo
processes trains each method again under FSDP2 (each decoder layer sharded, then the root, which owns
the adapter) with batch_size 1 and grad_accum 2: the same 4 examples per step. The per-step losses, the
final validation loss and the saved adapter tensors must agree to what float32 summation in another
order allows (bounds below). ASLoRA merges every B of a module type into one at step 5: the merged B
is the layer-weighted mean whatever order the pairs are chosen in, so rounding noise cannot change it.

    python scripts/fsdp_check.py [--out DIR] [--methods lora,sharea]   (bash scripts/fsdp_check.sh)

Prints one line per method and exits 1 if any differs beyond its bound.
"""

import argparse
import json
import math
import os
import subprocess
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from sharelora_cli.config.recipe import load_recipe
from sharelora_cli.models.tiny_model import build_tiny_model
from sharelora_cli.training.launch import worker_command

METHODS = ("lora", "sharea", "shareb", "shareab", "aslora", "miss", "vera", "tied-lora", "vblora")
STEPS = 10
LR = 3e-3
U = torch.finfo(torch.float32).eps / 2
# The factor by which an Adam step can scale a relative error of its gradient into its update: |m̂/√v̂| ≤ 1
# for a steady gradient, and up to (1 − β1)/√(1 − β2) ≈ 3.2 after a jump (Kingma & Ba, §2.1).
ADAM_GAIN = 3.2


def recipe(method: str, model_dir: Path, output_dir: Path, fsdp2: bool) -> dict:
    """The check's recipe: dropout 0 (each process would draw its own masks), 4 examples per step."""
    adapter: dict = {
        "method": method,
        "rank": 4,
        "alpha": 8,
        "dropout": 0.0,
        "targets": ["q_proj", "v_proj", "down_proj"],
    }
    if method == "aslora":
        adapter["aslora"] = {"merge_start": 0.5, "merge_end": 0.5, "target_groups": 1}
    if method == "vblora":
        adapter["vblora"] = {"vector_length": 16, "num_vectors": 32}
    return {
        "model": {"name_or_path": str(model_dir)},
        "adapter": adapter,
        "data": {"max_length": 128, "overlength": "drop", "max_examples": 200, "validation_fraction": 0.1},
        "train": {
            "max_steps": STEPS,
            "batch_size": 1 if fsdp2 else 2,
            "grad_accum": 2,
            "lr": LR,
            "warmup_steps": 2,
            "eval_every": STEPS,
            "eval_batches": 2,
            "checkpoint_every": 5,
            "report_to": [],
            "distributed": {"strategy": "fsdp2" if fsdp2 else "auto"},
        },
        "output_dir": str(output_dir),
    }


def train_all(model_dir: Path, out: Path, methods: list[str], fsdp2: bool) -> None:
    """Train every method in this process (or, under torch.distributed.run, in each of its processes)."""
    from sharelora_cli.training.loop import train

    name = "fsdp2" if fsdp2 else "single"
    for method in methods:
        rank = os.environ.get("RANK", "0")
        path = out / method / f"{name}-recipe.{rank}.yaml"  # one file per process
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recipe(method, model_dir, out / method / name, fsdp2)))
        # The runs' progress lines go to a log beside each run, so the check prints one line per method;
        # an error still reaches stderr, raised out of train().
        with open(out / method / f"{name}.{rank}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            train(load_recipe(str(path)))


def launch_fsdp2(model_dir: Path, out: Path, methods: list[str]) -> None:
    """All methods under FSDP2 in one launch of 2 processes (one start-up for all of them)."""
    arguments = ["--worker", "--model", str(model_dir), "--out", str(out), "--methods", ",".join(methods)]
    command = worker_command(2, arguments, program=(__file__,))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"fsdp_check: the FSDP2 launch failed:\n{result.stderr[-3000:]}")


@dataclass
class Comparison:
    method: str
    loss_gap: float  # largest |Δ loss| or |Δ gradient norm| over the steps, as a fraction of its bound
    val_gap: float
    tensor_gap: float  # largest ‖Δ tensor‖ / its bound
    worst_loss: float

    @property
    def ok(self) -> bool:
        return max(self.loss_gap, self.val_gap, self.tensor_gap) <= 1

    def line(self) -> str:
        verdict = "ok" if self.ok else "DIFFERS"
        return (
            f"{self.method:10s} {verdict:7s} max |Δloss| {self.worst_loss:.2e} "
            f"(fraction of bound: loss and grad norm {self.loss_gap:.3f}, val_loss {self.val_gap:.3f}, adapter {self.tensor_gap:.3f})"
        )


def mean_loss_bound(step: int, tokens: int, loss: float) -> float:
    """|Δ| allowed for a mean of `tokens` positive terms after `step` steps of training.

    The sum itself, in another order, is off by at most 2·γ_n·Σ|terms| = 2·γ_n·n·loss (Higham §3.1); each
    earlier step adds at most as much again through parameters that differ by their own gradients' rounding.
    """
    return step * 2 * tokens * U / (1 - tokens * U) * loss


def tensor_bound(whole: torch.Tensor, tokens: int, uses: int) -> float:
    """‖Δ‖ allowed for an adapter tensor after STEPS Adam steps of lr LR.

    Each step's gradient is a sum of tokens × uses terms, reordered (2·γ_n relative); Adam turns that into an
    update error of at most ADAM_GAIN times as much of the step's lr per entry, added over the steps.
    """
    n = tokens * uses
    relative = 2 * n * U / (1 - n * U)
    return STEPS * LR * ADAM_GAIN * relative * math.sqrt(whole.numel()) + STEPS * relative * float(whole.norm())


def compare(out: Path, method: str) -> Comparison:
    runs = {name: out / method / name for name in ("single", "fsdp2")}
    metrics = {
        name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for name, run in runs.items()
    }
    one, two = metrics["single"], metrics["fsdp2"]
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1))
    # Every step's tokens are summed twice (forward loss and backward), by at most this many per batch.
    tokens = max(m["tokens"] - prev for m, prev in zip(one, [0] + [m["tokens"] for m in one]))
    gaps = [abs(a["loss"] - b["loss"]) / mean_loss_bound(a["step"], tokens, a["loss"]) for a, b in zip(one, two)]
    # The gradient norm too: Adam would hide a gradient scaled by a constant (wrong averaging), clipping aside.
    gaps += [
        abs(a["grad_norm"] - b["grad_norm"]) / mean_loss_bound(a["step"], tokens, a["grad_norm"])
        for a, b in zip(one, two)
    ]
    val = [(a["val_loss"], b["val_loss"]) for a, b in zip(one, two) if "val_loss" in a]
    val_gap = max(abs(a - b) / mean_loss_bound(STEPS + 1, tokens, a) for a, b in val)
    first, second = (load_file(run / "adapter" / "adapter.safetensors") for run in runs.values())
    assert first.keys() == second.keys(), f"{method}: the adapters hold different tensors"
    layers = 4 * 3  # every adapted module of the tiny model: the most uses any shared tensor has
    tensor_gap = max(float((first[k] - second[k]).norm()) / tensor_bound(first[k], tokens, layers) for k in first)
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two))
    return Comparison(method, max(gaps), val_gap, tensor_gap, worst)


def run_check(out: Path, methods: list[str], model_dir: Path | None = None) -> list[Comparison]:
    model_dir = model_dir or build_tiny_model(out / "tiny-llama")
    train_all(model_dir, out, methods, fsdp2=False)
    launch_fsdp2(model_dir, out, methods)
    return [compare(out, method) for method in methods]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", type=Path, default=None, help="a tiny model folder (default: built afresh)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if args.worker:
        train_all(args.model, args.out, methods, fsdp2=True)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        rows = run_check(args.out or Path(scratch), methods, args.model)
    for row in rows:
        print(row.line())
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
