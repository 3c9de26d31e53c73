"""Profile training steps of bench_train.py's configurations with torch.profiler; prints the top ops.

    .venv/bin/python scripts/profile_step.py floor lora peft-lora [--preset cpu] [--rank 16] [--steps 2]

Each configuration is built fresh, warmed up for two steps, then profiled (CPU activities; CUDA too
on a GPU preset) over --steps steps. Findings are written up in docs/benchmarks.md.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_train  # noqa: E402  (a sibling script, not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", choices=bench_train.NAMES)
    parser.add_argument("--preset", choices=bench_train.PRESETS, default="cpu")
    parser.add_argument("--rank", type=int, default=None, help="override the preset's rank")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14, help="ops to print per configuration")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = bench_train.PRESETS[args.preset]
    preset = replace(preset, rank=args.rank or preset.rank)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if preset.device == "cuda" else [])
    for name in args.configs:
        base = bench_train.build_base(preset, seed=0)
        run = bench_train.make_run(name, base, preset, seed=0)
        batch = bench_train.make_batch(preset, base.config.vocab_size, seed=0)
        for _ in range(2):
            bench_train.train_step(run, batch)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                bench_train.train_step(run, batch)
        print(f"===== {name}: {args.steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
