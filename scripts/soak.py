"""Soak test: many short train -> checkpoint -> resume cycles on the tiny model, each checked against one
uninterrupted run.

First one uninterrupted run of all the steps the soak will need writes a checkpoint after every step:
the reference. Then one chain run grows cycle by cycle. A cycle resumes the chain from its newest
checkpoint and trains one more step in this process (train.max_steps one higher; the schedule is
constant, so that is the same run as the reference). Every --kill-every-th cycle instead runs
`sharelora train` in a subprocess, waits until it has written a new checkpoint, SIGKILLs it after a
random delay (inside a step or a checkpoint write), and checks that every checkpoint directory left
is complete. After each cycle the adapter of every new checkpoint is compared with the reference's
at the same step; any difference above --tolerance is a divergence (exit code 1).

    .venv/bin/python scripts/soak.py --cycles 1000 [--kill-every 50] [--model DIR] [--json PATH]
"""

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from safetensors.torch import load_file

from sharelora_cli.config.recipe import load_recipe
from sharelora_cli.models.tiny_model import build_tiny_model
from sharelora_cli.training.checkpoint import latest_checkpoint
from sharelora_cli.training.loop import train

# Steps a killed subprocess may run at most; it is usually killed one or two steps in.
KILL_SPAN = 4
CHECKPOINT_FILES = (
    "adapter/adapter.safetensors",
    "adapter/sharelora_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "trainer_state.json",
)


def soak_recipe(model_dir: Path, max_steps: int) -> dict:
    """A step takes a fraction of a second on 2 CPU cores; dropout makes every resume depend on the saved RNG state."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"method": "sharea", "rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"]},
        "data": {"max_length": 128, "overlength": "drop", "max_examples": 60, "validation_fraction": 0.0},
        "train": {
            "max_steps": max_steps,
            "batch_size": 2,
            "lr": 3e-3,
            "scheduler": "constant",
            "warmup_steps": 0,
            "log_every": 1,
            "eval_every": 10**9,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
        },
    }


def quiet_train(recipe_path: Path, overrides: list[str]) -> None:
    """train() in this process with its progress bars and prints discarded."""
    recipe = load_recipe(str(recipe_path), overrides)
    with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
        train(recipe)


def max_abs_diff(adapter_dir: Path, reference_dir: Path) -> float:
    got, expected = load_file(adapter_dir / "adapter.safetensors"), load_file(reference_dir / "adapter.safetensors")
    if got.keys() != expected.keys():
        return float("inf")
    return max(float((got[name] - expected[name]).abs().max()) for name in got)


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the checkpoint directories in run; raises if one is incomplete."""
    steps = []
    for checkpoint in run.glob("checkpoint-*"):
        missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
        if missing:
            raise RuntimeError(f"{checkpoint} is incomplete: {missing} missing")
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(checkpoint / name, weights_only=False)
        steps.append(int(checkpoint.name.split("-")[1]))
    return sorted(steps)


def killed_cycle(recipe_path: Path, run: Path, step: int, rng: random.Random) -> None:
    """`sharelora train` from step, SIGKILLed at a random moment after its first new checkpoint."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "sharelora_cli",
        "train",
        str(recipe_path),
        f"output_dir={run}",
        "resume=true",
        f"train.max_steps={step + KILL_SPAN}",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while (latest := latest_checkpoint(run)) is None or int(latest.name.split("-")[1]) <= step:
        if proc.poll() is not None:
            raise RuntimeError(f"killed cycle: training exited with {proc.returncode} before a new checkpoint")
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--kill-every", type=int, default=50, help="every Nth cycle is a SIGKILLed subprocess; 0: none")
    parser.add_argument("--model", type=Path, help="tiny model directory [default: build one in the work directory]")
    parser.add_argument("--workdir", type=Path, help="[default: a temporary directory, removed at the end]")
    parser.add_argument(
        "--tolerance", type=float, default=0.0, help="largest allowed |adapter - reference| (default: bitwise)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sharelora-soak-"))
    model_dir = args.model or build_tiny_model(workdir / "tiny-llama")
    # The last cycle always runs in this process, so the run ends finished, with its metrics log whole.
    kills = (args.cycles - 1) // args.kill_every if args.kill_every else 0
    total_steps = args.cycles + kills * KILL_SPAN + 1
    recipe_path = workdir / "soak.yaml"
    recipe_path.write_text(json.dumps(soak_recipe(model_dir, total_steps)))

    started = time.perf_counter()
    reference = workdir / "reference"
    quiet_train(recipe_path, [f"output_dir={reference}", f"train.keep_checkpoints={total_steps}"])
    reference_s = time.perf_counter() - started
    print(f"reference: {total_steps} uninterrupted steps in {reference_s:.0f} s", flush=True)

    rng = random.Random(args.seed)
    chain, step = workdir / "chain", 0
    diffs: list[float] = []
    killed_cycles = 0
    cycles_started = time.perf_counter()
    for cycle in range(1, args.cycles + 1):
        if args.kill_every and cycle % args.kill_every == 0 and 0 < step and cycle < args.cycles:
            killed_cycle(recipe_path, chain, step, rng)
            killed_cycles += 1
        else:
            quiet_train(
                recipe_path, [f"output_dir={chain}", f"train.max_steps={step + 1}", f"resume={str(step > 0).lower()}"]
            )
        steps = checkpoint_steps(chain)
        diffs += [
            max_abs_diff(chain / f"checkpoint-{s}" / "adapter", reference / f"checkpoint-{s}" / "adapter")
            for s in steps
            if s > step
        ]
        step = steps[-1]
        if cycle % 50 == 0 or cycle == args.cycles:
            elapsed = time.perf_counter() - cycles_started
            print(f"cycle {cycle}: step {step}, {elapsed / cycle:.2f} s/cycle, max |diff| {max(diffs):.3g}", flush=True)

    logged = [json.loads(line)["step"] for line in (chain / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "cycles": args.cycles,
        "killed_cycles": killed_cycles,
        "steps": step,
        "compared_checkpoints": len(diffs),
        "max_abs_diff": max(diffs),
        "diverged": sum(d > args.tolerance for d in diffs),
        "metrics_log_contiguous": logged == list(range(1, step + 1)),
        "reference_s": round(reference_s, 1),
        "cycles_s": round(time.perf_counter() - cycles_started, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir)
    sys.exit(1 if summary["diverged"] or not summary["metrics_log_contiguous"] else 0)


if __name__ == "__main__":
    main()
