"""Profile training steps of bench_train.py's configurations with torch.profiler: top ops, or dispatches per module.

    .venv/bin/python scripts/profile_step.py floor lora peft-lora [--preset cpu] [--rank 16] [--steps 2]
    .venv/bin/python scripts/profile_step.py --dispatches [CONFIG ...] [--json PATH]

Without --dispatches: each configuration is built fresh, warmed up for two steps, then profiled
(CPU activities; CUDA too on a GPU preset) over --steps steps, and its most expensive ops printed.

With --dispatches: the hardware-independent proxy for launch overhead that tests/test_dispatches.py
holds. On bench_train's 2-layer "smoke" Llama with adapters on all seven projections (14 adapted
modules), once with a float32 base and once with an NF4 base (bitsandbytes' CPU kernels), it counts
the operator dispatches of one training step (forward, backward, AdamW step, after two warm-up
steps) and prints, per configuration,

    (dispatches of the configuration − dispatches of the floor) / adapted modules.

A dispatch is a *top-level aten op*: a torch.profiler event named `aten::...` none of whose
enclosing events is itself an `aten::` event. It counts every call into PyTorch's operator library
made by Python code, by autograd's engine (one backward formula) or by the optimizer, and not the
ops those run inside themselves (linear's own transpose and mm, autocast's casts). Views and
reshapes count: each costs a dispatch, though no GPU kernel. The floor is the frozen base; in
every configuration, the floor included, the input embeddings require grad, so each backward runs
through every layer. Counts are deterministic for one torch version; docs/benchmarks.md has them.
"""

import argparse
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_train

DISPATCH_BASES = {"fp32": "smoke", "nf4": "smoke-nf4"}


def top_level_aten_ops(prof: profile) -> Counter:
    """name -> count of the profiled aten ops that no other aten op encloses (module docstring)."""
    counts: Counter = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def step_dispatches(name: str, preset: bench_train.Preset) -> Counter:
    """Top-level aten ops of one training step of configuration `name`, after two warm-up steps."""
    base = bench_train.build_base(preset, seed=0)
    base.enable_input_require_grads()
    run = bench_train.make_run(name, base, preset, seed=0)
    batch = bench_train.make_batch(preset, base.config.vocab_size, seed=0)
    for _ in range(2):
        bench_train.train_step(run, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bench_train.train_step(run, batch)
    return top_level_aten_ops(prof)


def adapted_modules(preset: bench_train.Preset) -> int:
    model = preset.model
    return len(bench_train.TARGETS) * model["num_hidden_layers"]


def dispatches_per_module(configs: list[str]) -> dict[str, dict[str, float]]:
    """base ('fp32', 'nf4') -> configuration -> dispatches per adapted module above the floor.

    A configuration that cannot run on a base (bench_train.runs_on: PEFT's VB-LoRA on NF4) has no entry there.
    """
    result = {}
    for base, preset_name in DISPATCH_BASES.items():
        preset = bench_train.PRESETS[preset_name]
        floor = sum(step_dispatches("floor", preset).values())
        modules = adapted_modules(preset)
        result[base] = {
            name: (sum(step_dispatches(name, preset).values()) - floor) / modules
            for name in configs
            if bench_train.runs_on(name, preset)
        }
    return result


def print_top_ops(args: argparse.Namespace) -> None:
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


def print_dispatches(args: argparse.Namespace) -> None:
    configs = args.configs or [name for name in bench_train.NAMES if name != "floor"]
    counts = dispatches_per_module(configs)
    print("dispatches per adapted module and training step, above the frozen base (2-layer Llama, 14 modules)")
    print("| configuration | fp32 base | NF4 base |\n| --- | ---: | ---: |")
    for name in configs:
        print(f"| {name} | {figure(counts['fp32'], name)} | {figure(counts['nf4'], name)} |")
    if args.json:
        args.json.write_text(json.dumps(counts, indent=2) + "\n")


def figure(counts: dict[str, float], name: str) -> str:
    return f"{counts[name]:.2f}" if name in counts else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help=f"configurations: {', '.join(bench_train.NAMES)}")
    parser.add_argument(
        "--dispatches",
        action="store_true",
        help="count dispatches per adapted module (fp32 and NF4 bases) instead of timing ops",
    )
    parser.add_argument("--json", type=Path, default=None, help="with --dispatches: write {base: {config: count}}")
    parser.add_argument("--preset", choices=bench_train.PRESETS, default="cpu")
    parser.add_argument("--rank", type=int, default=None, help="override the preset's rank")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14, help="ops to print per configuration")
    args = parser.parse_args()
    unknown = set(args.configs) - set(bench_train.NAMES)
    if unknown:
        parser.error(f"unknown configurations {', '.join(sorted(unknown))}; choose from {', '.join(bench_train.NAMES)}")
    torch.set_num_threads(args.threads)
    if args.dispatches:
        print_dispatches(args)
    elif args.configs:
        print_top_ops(args)
    else:
        parser.error("name the configurations to profile, or pass --dispatches")


if __name__ == "__main__":
    main()
