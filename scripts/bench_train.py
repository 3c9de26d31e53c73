"""Training step time and peak memory of every adapter method against the frozen base and PEFT.

One run of this script compares, on the same random-weight Llama, batch and seed:
floor (the frozen base alone; its input embeddings require grad so backward still runs through
every layer), peft-lora, lora, sharea, shareb, shareab, miss, peft-miss, aslora, vera, peft-vera,
tied-lora, vblora, peft-vblora, lily, peft-lily, unilora, peft-unilora, tinylora, peft-tinylora, randlora
and peft-randlora (sharelora's rows when the registry has the method), all adapters on the seven projections
with the same rank. VeRA, VB-LoRA, Lily, UniLoRA and TinyLoRA keep PEFT's defaults otherwise (VB-LoRA: 256
vectors, top-2, vector length 256 or the largest divisor of every width below it; TinyLoRA: u = 64, no
tying); RandLoRA's scale is alpha = 2 x rank, as LoRA's. PEFT's VB-LoRA, Lily, UniLoRA and TinyLoRA cannot
wrap 4-bit layers, so their rows are left out of the nf4 presets.

Timing: every configuration lives in this process at once (they share the frozen base weights;
only module trees and adapters are separate) and is timed round-robin: each round runs
--steps training steps (forward + backward + AdamW step) of every configuration, in an order
rotated by one per round, after --warmup untimed steps each. step_time_s is the median of all
timed steps; the ratios are medians over rounds of the within-round ratio, so a burst of
background load that hits one round hits every configuration of it alike.

Peak memory: what training adds to a loaded base (adapter weights, gradients, optimizer state and
activations), peak_mem_bytes. On CUDA it is measured in this process, configuration after
configuration as they are built: the peak of torch.cuda.max_memory_allocated over building the
configuration and its first two steps, above what was allocated before (exact per tensor, so the
configurations built earlier do not count). On CPU the resident set size cannot be reset that way,
so each configuration runs in a forked child process (no re-import) that builds the base, takes a
baseline, then injects the adapter and runs two steps: the kernel's high-water mark, reset to the
current RSS through /proc/self/clear_refs after glibc's malloc_trim returned freed heap to the OS.
--skip-memory skips the measurement (peak_mem_bytes is then null).

    .venv/bin/python scripts/bench_train.py [--preset cpu] [--skip-memory] [--json PATH] [--markdown PATH]
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import (
    LilyConfig,
    LoraConfig,
    MissConfig,
    RandLoraConfig,
    TinyLoraConfig,
    UniLoraConfig,
    VBLoRAConfig,
    VeraConfig,
    get_peft_model,
)
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.core.peak_memory import PeakMeter
from sharelora_cli.models.loading import load_config, prepare_for_kbit_training
from sharelora_cli.training.liger import apply_liger_kernel, require_liger_kernel
from sharelora_cli.training.loop import adamw

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The frozen floor, then each method (sharelora's rows when the registry has it) with PEFT's beside it where PEFT has one.
ALL_NAMES = [
    "floor",
    "peft-lora",
    "lora",
    "sharea",
    "shareb",
    "shareab",
    "miss",
    "peft-miss",
    "aslora",
    "vera",
    "peft-vera",
    "tied-lora",
    "vblora",
    "peft-vblora",
    "lily",
    "peft-lily",
    "unilora",
    "peft-unilora",
    "tinylora",
    "peft-tinylora",
    "randlora",
    "peft-randlora",
]
# PEFT configurations that cannot wrap a 4-bit layer, left out of the nf4 presets.
NOT_ON_4BIT = {"peft-vblora": "VB-LoRA", "peft-lily": "Lily", "peft-unilora": "UniLoRA", "peft-tinylora": "TinyLoRA"}
NAMES = [name for name in ALL_NAMES if name == "floor" or name.startswith("peft-") or name in METHODS]
# A ~30M-parameter Llama (GQA, 8 layers): a step takes about a second on two CPU cores.
CPU_MODEL = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 8192,
    "tie_word_embeddings": True,
}
SMOKE_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Preset:
    """What is benchmarked: the architecture (LlamaConfig fields or a recipes/models name) and the step."""

    model: dict | str
    device: str
    dtype: torch.dtype
    nf4: bool  # 4-bit NF4 base (bitsandbytes), QLoRA style: bf16 compute, float32 norms and adapters
    batch_size: int
    seq_len: int
    rank: int
    compile_mode: str | None = None  # torch.compile every configuration's model in this mode (--compile)
    liger_kernel: bool = False  # Liger's kernels in the base, for every configuration (--liger-kernel)


PRESETS = {
    # Rank 8 on hidden 512 keeps r/d_model at 1/64, the ShareLoRA paper's r=64 on LLaMA-7B's 4096:
    # the adapter's share of the compute is then what it is at real sizes (docs/benchmarks.md).
    "cpu": Preset(CPU_MODEL, "cpu", torch.float32, False, batch_size=4, seq_len=256, rank=8),
    # bitsandbytes' CPU kernels for the NF4 base, float32 compute: what quantization.load_in_4bit does on CPU.
    "cpu-nf4": Preset(CPU_MODEL, "cpu", torch.float32, True, batch_size=4, seq_len=256, rank=8),
    "smoke": Preset(SMOKE_MODEL, "cpu", torch.float32, False, batch_size=1, seq_len=16, rank=4),
    "smoke-nf4": Preset(SMOKE_MODEL, "cpu", torch.float32, True, batch_size=1, seq_len=16, rank=4),
    "llama-3.2-1b-bf16": Preset("llama-3.2-1b", "cuda", torch.bfloat16, False, batch_size=4, seq_len=512, rank=16),
    "llama-3.2-1b-nf4": Preset("llama-3.2-1b", "cuda", torch.bfloat16, True, batch_size=4, seq_len=512, rank=16),
    "llama3-8b-bf16": Preset("llama3-8b", "cuda", torch.bfloat16, False, batch_size=2, seq_len=512, rank=16),
    "llama3-8b-nf4": Preset("llama3-8b", "cuda", torch.bfloat16, True, batch_size=2, seq_len=512, rank=16),
}


@dataclass
class Run:
    """One configuration ready to train: its model and its optimizer (None for the floor)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None


# ---------------------------------------------------------------- building the configurations


def build_base(preset: Preset, seed: int) -> nn.Module:
    """The frozen random-weight base, in the preset's dtype on its device (4-bit linears when nf4)."""
    config = LlamaConfig(**preset.model) if isinstance(preset.model, dict) else load_config(preset.model)
    torch.manual_seed(seed)
    with torch.device(preset.device):
        model = AutoModelForCausalLM.from_config(config, dtype=preset.dtype)
    if preset.nf4:
        quantize_linears(model, preset.dtype)
        prepare_for_kbit_training(model)
    if preset.liger_kernel:
        require_liger_kernel(torch.device(preset.device))
        apply_liger_kernel(model)
    return model.requires_grad_(False)


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Swap every nn.Linear but the LM head for an NF4 Linear4bit, as from_pretrained(load_in_4bit) would."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            compress_statistics=True,
            device="meta",
        )
        # Params4bit quantizes when moved to a device; double quantisation (compress_statistics) as QLoRA.
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, module=quantized
        ).to(module.weight.device)
        if module.bias is not None:
            quantized.bias = module.bias
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)


def share_base(base: nn.Module) -> nn.Module:
    """A copy of the model's modules that shares every parameter and buffer tensor with `base`."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


def configure(name: str, model: nn.Module, rank: int) -> nn.Module:
    """Make `model` the configuration `name` (in place where possible); returns the model to train."""
    if name == "floor":
        model.enable_input_require_grads()
        return model
    bank = vblora_bank(model)
    if name == "peft-lora":
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS))
    if name == "peft-miss":
        return get_peft_model(model, MissConfig(r=rank, target_modules=TARGETS, init_weights=True))
    if name == "peft-vera":
        return get_peft_model(model, VeraConfig(r=rank, target_modules=TARGETS))
    if name == "peft-vblora":
        return get_peft_model(model, VBLoRAConfig(r=rank, target_modules=TARGETS, **bank))
    if name == "peft-lily":
        return get_peft_model(model, LilyConfig(r=rank, target_modules=TARGETS))
    if name == "peft-unilora":
        return get_peft_model(model, UniLoraConfig(r=rank, target_modules=TARGETS))
    if name == "peft-tinylora":
        return get_peft_model(model, TinyLoraConfig(r=rank, target_modules=TARGETS))
    if name == "peft-randlora":
        return get_peft_model(model, RandLoraConfig(r=rank, randlora_alpha=2 * rank, target_modules=TARGETS))
    inject_adapter(
        model, AdapterConfig(method=name, rank=rank, alpha=2 * rank, dropout=0.0, targets=TARGETS, vblora=bank)
    )
    find_shared_inputs(model, model.device)  # as training does: grouped from the first step
    return model


def vblora_bank(model: nn.Module) -> dict:
    """VB-LoRA's bank settings: PEFT's defaults, the vector length cut to a divisor of every adapted width."""
    widths = [
        size
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
        for size in (module.in_features, module.out_features)
    ]
    return {"num_vectors": 256, "vector_length": math.gcd(256, *widths)}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The distinct trainable tensors (a shared factor once: Module.parameters() de-duplicates)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_run(name: str, base: nn.Module, preset: Preset, seed: int) -> Run:
    torch.manual_seed(seed)  # the same adapter initialisation whatever was built before
    model = configure(name, base, preset.rank)
    params = trainable(model)
    if preset.compile_mode:
        model = torch.compile(model, mode=preset.compile_mode)
    return Run(model, adamw(params, lr=1e-4, weight_decay=0.0) if params else None)


def make_batch(preset: Preset, vocab_size: int, seed: int) -> torch.Tensor:
    """Random token ids (step time does not depend on their values); labels are the inputs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (preset.batch_size, preset.seq_len), generator=generator)
    return ids.to(preset.device)


# ---------------------------------------------------------------- one step, timed


def train_step(run: Run, batch: torch.Tensor) -> None:
    device = batch.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = run.model(input_ids=batch, labels=batch).loss
    loss.backward()
    if run.optimizer is not None:
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)


def timed_step(run: Run, batch: torch.Tensor) -> float:
    synchronize = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    train_step(run, batch)
    synchronize()
    return time.perf_counter() - start


def time_round_robin(
    runs: dict[str, Run], batch: torch.Tensor, rounds: int, steps: int, warmup: int
) -> dict[str, list[list[float]]]:
    """name -> per round, the step times; the order of configurations rotates by one every round."""
    for run in runs.values():
        for _ in range(warmup):
            train_step(run, batch)
    names = list(runs)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append([timed_step(runs[name], batch) for _ in range(steps)])
    return times


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )


# ---------------------------------------------------------------- peak memory, one child process each


def child_peak(name: str, preset: Preset, seed: int, threads: int) -> int:
    """In a fresh child: build the base, then measure what configuring and two steps add on top of it."""
    torch.set_num_threads(threads)
    base = build_base(preset, seed)
    batch = make_batch(preset, base.config.vocab_size, seed)
    meter = PeakMeter(preset.device)
    run = make_run(name, base, preset, seed)
    for _ in range(2):  # the second step is the first with optimizer state, gradients and activations at once
        train_step(run, batch)
    return meter.peak()


def peak_memory_forked(names: list[str], preset: Preset, seed: int, threads: int) -> dict[str, int]:
    """CPU: one forked child per configuration (free here: this process has run no kernels yet)."""
    peaks = {}
    for name in names:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            peaks[name] = pool.apply(child_peak, (name, preset, seed, threads))
    return peaks


def runs_with_cuda_peaks(
    names: list[str], base: nn.Module, preset: Preset, batch: torch.Tensor, seed: int
) -> tuple[dict[str, Run], dict[str, int]]:
    """CUDA: build each configuration and run its first two steps under the allocator's peak counter."""
    runs, peaks = {}, {}
    for name in names:
        meter = PeakMeter(preset.device)
        runs[name] = make_run(name, share_base(base), preset, seed)
        for _ in range(2):
            train_step(runs[name], batch)
        peaks[name] = meter.peak()
    return runs, peaks


# ---------------------------------------------------------------- results


def median_ratio(times: dict[str, list[list[float]]], name: str, reference: str) -> float | None:
    if reference not in times:
        return None
    return statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(times[name], times[reference]))


def make_rows(times: dict[str, list[list[float]]], runs: dict[str, Run], peaks: dict[str, int]) -> list[dict]:
    return [
        {
            "name": name,
            "step_time_s": statistics.median(t for steps in times[name] for t in steps),
            "peak_mem_bytes": peaks.get(name),
            "optimizer_state_bytes": optimizer_state_bytes(runs[name].optimizer),
            "trainable_params": sum(p.numel() for p in trainable(runs[name].model)),
            "ratio_to_floor": median_ratio(times, name, "floor"),
            "ratio_to_peft_lora": median_ratio(times, name, "peft-lora"),
            # Sharing saves no matmul, so ShareA/B/AB vs LoRA is a small difference: pair it directly.
            "ratio_to_lora": median_ratio(times, name, "lora"),
        }
        for name in times
    ]


def markdown_table(rows: list[dict]) -> str:
    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    def mib(value: int | None) -> str:
        return "—" if value is None else f"{value / 2**20:.1f}"

    lines = [
        "| configuration | step time (s) | × floor | × PEFT LoRA | × LoRA | peak memory (MiB) "
        "| optimizer state (MiB) | trainable params |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['step_time_s']:.3f} | {ratio(row['ratio_to_floor'])} | "
            f"{ratio(row['ratio_to_peft_lora'])} | {ratio(row['ratio_to_lora'])} | "
            f"{mib(row['peak_mem_bytes'])} | "
            f"{row['optimizer_state_bytes'] / 2**20:.2f} | {row['trainable_params']:,} |"
        )
    return "\n".join(lines)


def describe_setup(args: argparse.Namespace, preset: Preset, base: nn.Module, load: tuple[list, list]) -> str:
    """What the numbers were measured on, for the Markdown report."""
    cfg = base.config
    parameters = sum(p.numel() for p in base.parameters())
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU, {proc_meminfo_gib():.0f} GiB RAM"
    if preset.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    base_kind = "NF4 4-bit (bitsandbytes)" if preset.nf4 else str(preset.dtype).removeprefix("torch.")
    return "\n".join(
        [
            f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
            f"- machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads",
            f"- model: random-weight Llama, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
            f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, {parameters / 1e6:.1f}M parameters, {base_kind}",
            f"- step: batch {preset.batch_size} × {preset.seq_len} tokens, rank {preset.rank} (alpha {2 * preset.rank}) on "
            f"{', '.join(TARGETS)}, AdamW (fused); {args.warmup} warm-up steps, {args.rounds} rounds × {args.steps} timed steps"
            f"{f'; torch.compile mode {preset.compile_mode}' if preset.compile_mode else ''}"
            f"{'; Liger kernels' if preset.liger_kernel else ''}",
            f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load[0])}; "
            f"after: {', '.join(f'{x:.2f}' for x in load[1])}",
        ]
    )


def proc_meminfo_gib() -> float:
    first = Path("/proc/meminfo").read_text().splitlines()[0]  # MemTotal: N kB
    return int(first.split()[1]) / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--configs", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the rows as a JSON list")
    parser.add_argument("--markdown", type=Path, default=None, help="write the set-up and table as Markdown")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory (peak_mem_bytes: null)")
    parser.add_argument(
        "--compile",
        choices=["default", "reduce-overhead"],
        default=None,
        help="torch.compile every configuration in this mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--liger-kernel",
        action="store_true",
        help="Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy in the base (CUDA)",
    )
    args = parser.parse_args(argv)
    if args.liger_kernel and PRESETS[args.preset].device != "cuda":
        parser.error("--liger-kernel needs a CUDA preset (Liger's kernels are Triton)")
    unknown = set(args.configs.split(",")) - set(NAMES)
    if unknown:
        parser.error(f"--configs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(NAMES)}")
    return args


def chosen_names(args: argparse.Namespace, preset: Preset) -> list[str]:
    """The configurations asked for that can run on the preset."""
    names = [name for name in NAMES if name in args.configs.split(",")]
    for name in [name for name in names if not runs_on(name, preset)]:
        print(f"note: {name} left out: PEFT's {NOT_ON_4BIT[name]} cannot adapt 4-bit layers", file=sys.stderr)
        names.remove(name)
    return names


def runs_on(name: str, preset: Preset) -> bool:
    """Whether configuration `name` can run on the preset's base (NOT_ON_4BIT wrap no 4-bit layer)."""
    return not (preset.nf4 and name in NOT_ON_4BIT)


def chosen_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    return replace(
        preset,
        batch_size=args.batch_size or preset.batch_size,
        seq_len=args.seq_len or preset.seq_len,
        compile_mode=args.compile,
        liger_kernel=args.liger_kernel,
    )


def main() -> None:
    args = parse_args()
    preset = chosen_preset(args)
    names = chosen_names(args, preset)
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    forked = not args.skip_memory and preset.device != "cuda"
    # Forked first, while this process holds no model.
    peaks = peak_memory_forked(names, preset, args.seed, args.threads) if forked else {}
    base = build_base(preset, args.seed)
    batch = make_batch(preset, base.config.vocab_size, args.seed)
    if preset.device == "cuda" and not args.skip_memory:
        runs, peaks = runs_with_cuda_peaks(names, base, preset, batch, args.seed)
    else:
        runs = {name: make_run(name, share_base(base), preset, args.seed) for name in names}
    times = time_round_robin(runs, batch, args.rounds, args.steps, args.warmup)
    rows = make_rows(times, runs, peaks)
    report = describe_setup(args, preset, base, (load_before, list(os.getloadavg()))) + "\n\n" + markdown_table(rows)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()
