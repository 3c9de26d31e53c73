"""Peak memory of `sharelora merge` on a ~1B-parameter random Llama, as a multiple of the merged weights' size.

Builds the architecture (default: recipes/models/llama-3.2-1b) with random bf16 weights, saves it,
saves a random LoRA adapter on all seven projections, and runs `sharelora merge` under GNU time
(/usr/bin/time), whose maximum-RSS figure is the merge process's own. (getrusage(RUSAGE_CHILDREN)
would not do here: a child spawned from this process inherits this process's own peak, which
holds the random model while it is built.) Needs ~2x the model size on disk.

    .venv/bin/python scripts/bench_merge_memory.py [--model llama-3.2-1b] [--rank 16] [--workdir DIR]
"""

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sharelora_cli.adapters.adapter_io import save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.models.loading import load_config

GNU_TIME = "/usr/bin/time"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base_and_adapter(model: str, rank: int, workdir: Path) -> tuple[Path, Path, int]:
    """Save a random bf16 model and a random LoRA adapter for it; returns (base dir, adapter dir, parameters)."""
    torch.manual_seed(0)
    network = AutoModelForCausalLM.from_config(load_config(model), dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in network.parameters())
    base_dir, adapter_dir = workdir / "base", workdir / "adapter"
    network.save_pretrained(base_dir)
    adapter = inject_adapter(network, AdapterConfig(method="lora", rank=rank, targets=TARGETS))
    with torch.no_grad():
        for factor in adapter.parameters():
            factor.normal_(0, 0.02)  # non-zero B, so every target really receives a ΔW
    save_adapter(adapter, adapter_dir, base_model=str(base_dir))
    return base_dir, adapter_dir, parameters


def run_merge(adapter_dir: Path, out_dir: Path, workdir: Path) -> tuple[list[str], float, int]:
    """Run the CLI under GNU time; returns (command, seconds, peak RSS in bytes)."""
    command = [
        str(Path(sys.executable).with_name("sharelora")),
        "merge",
        "--adapter",
        str(adapter_dir),
        "--out",
        str(out_dir),
    ]
    report = workdir / "time.txt"
    start = time.perf_counter()
    subprocess.run(
        [GNU_TIME, "-f", "%M", "-o", str(report), *command], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - start
    return command, seconds, int(report.read_text().split()[-1]) * 1024  # %M is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b", help="config directory or recipes/models name")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write base, adapter, merged (temp dir)")
    args = parser.parse_args()
    if not Path(GNU_TIME).is_file():
        sys.exit(f"{GNU_TIME} not found: install GNU time (apt-get install time)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        _base_dir, adapter_dir, parameters = build_base_and_adapter(args.model, args.rank, workdir)
        gc.collect()
        command, seconds, peak = run_merge(adapter_dir, workdir / "merged", workdir)
        merged = sum(p.stat().st_size for p in (workdir / "merged").glob("*.safetensors"))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"model: {args.model}, {parameters / 1e9:.2f}B parameters (bf16), LoRA rank {args.rank} on {len(TARGETS)} targets"
    )
    print(f"command: {' '.join(command)}")
    print(f"merge time: {seconds:.1f} s")
    print(
        f"peak RSS: {peak / 2**30:.2f} GiB; merged weights: {merged / 2**30:.2f} GiB; "
        f"peak / merged = {peak / merged:.2f}x"
    )


if __name__ == "__main__":
    main()
