"""Per-process memory under FSDP2 against DDP: 2 gloo processes, the same model, adapter and steps.

    python scripts/fsdp_memory.py [--out DIR] [--layers 8] [--hidden 512] [--steps 3] [--load-in-4bit]
                                  [--doc docs/distributed.md]

The model is a Llama built from a config (random weights, the GSM8K-trained tokenizer) big enough that its
frozen base dominates; the adapter is LoRA rank 8 on q_proj and v_proj. Each process trains through the
training loop's own set-up and steps, then counts from its local tensors (under FSDP2 a DTensor's local shard):
the frozen base's parameter bytes, the adapter's, the gradients' (at the optimizer step, before they are
cleared) and the optimizer state's; and reads its RSS from /proc: after imports, after the last step, and the
peak (VmHWM). Prints one table row per strategy and rank; --doc writes the table into that page between its
`fsdp-memory` markers (`fsdp-memory-4bit` with --load-in-4bit).
"""

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from sharelora_cli.core.doc_sections import replace_section
from sharelora_cli.core.peak_memory import proc_status_bytes
from sharelora_cli.training.launch import worker_command

STRATEGIES = ("ddp", "fsdp2")
MIB = 1 << 20


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes this process holds for a tensor: a DTensor's local shard, else the whole tensor."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def recipe(model_dir: Path, output_dir: Path, strategy: str, steps: int, load_in_4bit: bool = False) -> dict:
    """load_in_4bit: an NF4 base with float32 compute (bitsandbytes' CPU kernels), its packed bytes held as float32."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"load_in_4bit": load_in_4bit, "compute_dtype": "float32"},
        "adapter": {"method": "lora", "rank": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "data": {"max_length": 256, "overlength": "drop", "max_examples": 200, "validation_fraction": 0.05},
        "train": {
            "max_steps": steps,
            "batch_size": 2,
            "eval_every": 1000,
            "checkpoint_every": 1000,
            "report_to": [],
            "distributed": {"strategy": strategy},
        },
        "output_dir": str(output_dir),
    }


def measure(recipe_file: Path, result_file: Path) -> None:
    """In each worker: set up and train through the loop's own functions, then count and write this rank's row."""
    from sharelora_cli.config.recipe import load_recipe
    from sharelora_cli.evaluation.runner import CodeExecution
    from sharelora_cli.training.loop import run_step, set_up
    from sharelora_cli.training.run_lock import RunLock

    after_imports = proc_status_bytes("VmRSS")
    recipe = load_recipe(str(recipe_file))
    lock = RunLock(Path(recipe.output_dir))
    run = set_up(recipe, CodeExecution(), lock)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # Accelerate's wrapper holds the torch one
    grads: list[int] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(
            sum(local_bytes(p.grad) for group in opt.param_groups for p in group["params"] if p.grad is not None)
        )
    )
    for _ in range(recipe.train.max_steps):
        run_step(run)
    model = run.accelerator.unwrap_model(run.model)
    # FSDP2 leaves the root unit (embeddings, output head, the adapter) gathered after its backward: counted
    # here, then every unit is resharded so that the columns below are each rank's share.
    gathered = sum(local_bytes(p) for p in model.parameters() if not isinstance(p, DTensor))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    params = list(model.parameters())
    row = {
        "strategy": run.distribution.strategy,
        "rank": run.accelerator.process_index,
        "processes": run.accelerator.num_processes,
        "gathered_after_step_bytes": gathered if run.distribution.strategy == "fsdp2" else None,
        "base_param_bytes": sum(local_bytes(p) for p in params if not p.requires_grad),
        "adapter_param_bytes": sum(local_bytes(p) for p in params if p.requires_grad),
        "grad_bytes": max(grads),
        "optimizer_state_bytes": sum(
            local_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
        ),
        "rss_after_imports_bytes": after_imports,
        "rss_after_steps_bytes": proc_status_bytes("VmRSS"),
        "peak_rss_bytes": proc_status_bytes("VmHWM"),
    }
    result_file.write_text(json.dumps(row) + "\n")
    run.accelerator.wait_for_everyone()
    lock.release()


def run_strategy(model_dir: Path, out: Path, strategy: str, steps: int, load_in_4bit: bool = False) -> list[dict]:
    recipe_file = out / f"{strategy}.json"
    recipe_file.write_text(json.dumps(recipe(model_dir, out / strategy, strategy, steps, load_in_4bit)))
    command = worker_command(2, ["--worker", str(recipe_file), str(out)], program=(__file__,))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"fsdp_memory: the {strategy} launch failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"{strategy}-rank{rank}.json").read_text()) for rank in range(2)]


def table(rows: list[dict]) -> str:
    lines = [
        "| strategy | rank | frozen base params | adapter params | gradients | optimizer state "
        "| FSDP2 root unit gathered after a step | RSS after imports | RSS after steps | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gathered = row["gathered_after_step_bytes"]
        lines.append(
            f"| {row['strategy']} | {row['rank']} | {row['base_param_bytes'] / MIB:.1f} MiB "
            f"| {row['adapter_param_bytes'] / 1024:.0f} KiB | {row['grad_bytes'] / 1024:.0f} KiB "
            f"| {row['optimizer_state_bytes'] / 1024:.0f} KiB "
            f"| {'-' if gathered is None else f'{gathered / MIB:.1f} MiB'} | {row['rss_after_imports_bytes'] / MIB:.0f} MiB "
            f"| {row['rss_after_steps_bytes'] / MIB:.0f} MiB | {row['peak_rss_bytes'] / MIB:.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--load-in-4bit", action="store_true", help="an NF4 base (float32 compute)")
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this page's fsdp-memory section")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        recipe_file, out = args.worker
        strategy = recipe_file.stem
        measure(recipe_file, out / f"{strategy}-rank{os.environ['RANK']}.json")
        return 0
    from sharelora_cli.models.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        model_dir = build_tiny_model(out / "model", hidden=args.hidden, layers=args.layers)
        rows = [
            row
            for strategy in STRATEGIES
            for row in run_strategy(model_dir, out, strategy, args.steps, args.load_in_4bit)
        ]
    text = table(rows)
    print(text)
    if args.doc:
        nf4 = " --load-in-4bit" if args.load_in_4bit else ""
        command = (
            f"python scripts/fsdp_memory.py --layers {args.layers} --hidden {args.hidden} --steps {args.steps}{nf4}"
        )
        section = "fsdp-memory-4bit" if args.load_in_4bit else "fsdp-memory"
        replace_section(args.doc, section, f"`{command}`\n\n{text}", "Distributed training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
