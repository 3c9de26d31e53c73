"""Method study: every adapter method fine-tuned on the tiny pretrained base, scored on held-out word problems.

    .venv/bin/python scripts/method_study.py --out runs/method-study --json docs/method_study.json

Each run fine-tunes one (method, rank, seed) on the held-back `story` skill of sharelora_cli/data/synthetic_tasks.py
(artifacts/synthetic-tasks/story/train.jsonl) from the base built by `scripts/make_tiny_model.py --pretrain`,
then scores the 200 held-out problems (test.jsonl) with the GSM8K evaluator, 0-shot, greedy, exact match of
the number after "#### ". Every run gets the same steps, batches (per seed), learning rate, schedule, targets
(all seven projections) and alpha = 2 x rank: nothing is tuned per method.

Two sweeps: every method at each --ranks, and every method at the rank whose trainable-parameter count is
closest to LoRA's at each --match-lora-ranks (the ShareLoRA papers' claim is about equal parameter budgets).
peft-lora is Hugging Face PEFT's LoRA trained by the same step function on the same batches, an outside
reference for sharelora's LoRA. Add a method by adding an entry to TRAINERS; every method in sharelora's
registry is already one.

A finished run leaves row.json in its folder under --out and is reused when the study is run again, so an
interrupted study continues where it stopped. Writes --json (one row per run), the Markdown tables between
the study markers of --markdown, and --plot (needs matplotlib: pip install -e .[plots]).
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import set_seed

from sharelora_cli.adapters.aslora import target_plan
from sharelora_cli.adapters.inject import plan_trainable, planned_plan
from sharelora_cli.config.recipe import METHOD_NAMES, AdapterConfig, Recipe, validate
from sharelora_cli.core.doc_sections import replace_section
from sharelora_cli.core.lr_schedule import make_scheduler
from sharelora_cli.core.study_runs import finished_or_run, run_all, whole_numbers
from sharelora_cli.data.examples import StepSampler, build_splits, collate
from sharelora_cli.data.synthetic_tasks import FINE_TUNING_SKILL
from sharelora_cli.evaluation import gsm8k
from sharelora_cli.evaluation.engine import Engine, context_window
from sharelora_cli.evaluation.results import TaskResult
from sharelora_cli.evaluation.runner import build_engine
from sharelora_cli.models.loading import build_on_meta, load_config, load_model, load_tokenizer
from sharelora_cli.training.loop import make_accelerator, train, train_step

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_METHODS = ["lora", "sharea", "shareb", "shareab", "aslora", "miss", "vera", "tied-lora", "vblora", "peft-lora"]
# PEFT's VB-LoRA vector length; smaller where it does not divide the base's widths.
VBLORA_VECTOR_LENGTH = 256
# The study's accuracy: strict match, the number after "#### " equals the reference's.
ACCURACY_METRIC = "strict-match"
SECTION = "method-study"


@dataclass(frozen=True)
class Settings:
    """What every run shares."""

    base: str
    tasks: str
    steps: int
    batch_size: int
    lr: float
    out: Path
    vblora_vector_length: int


@dataclass(frozen=True)
class Run:
    method: str
    rank: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.rank}-s{self.seed}"


@dataclass
class Row:
    method: str
    rank: int
    seed: int
    accuracy: float
    trainable_params: int
    step_time_s: float


def recipe(run: Run, settings: Settings) -> Recipe:
    """The run as a sharelora recipe (peft-lora reads the same one as LoRA)."""
    return validate({
        "model": {"name_or_path": settings.base},
        "adapter": adapter_settings(run.method, run.rank, settings.vblora_vector_length),
        "data": {"path": f"{settings.tasks}/{FINE_TUNING_SKILL}/train.jsonl", "max_length": 128,
                 "validation_fraction": 0.0},
        "train": {"max_steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr,
                  "warmup_steps": settings.steps // 15, "scheduler": "cosine", "seed": run.seed,
                  "log_every": settings.steps, "eval_every": settings.steps, "checkpoint_every": settings.steps},
        "eval": {"tasks": ["gsm8k"], "batch_size": 64,
                 "gsm8k": {"path": f"{settings.tasks}/{FINE_TUNING_SKILL}", "num_fewshot": 0, "max_new_tokens": 48}},
        "output_dir": str(settings.out / run.name),
    })  # fmt: skip


def adapter_settings(method: str, rank: int, vblora_vector_length: int) -> dict:
    """The recipe's adapter section: every method at alpha = 2 x rank on all seven projections."""
    return {
        "method": "lora" if method == "peft-lora" else method,
        "rank": rank,
        "alpha": 2.0 * rank,
        "targets": TARGETS,
        "vblora": {"vector_length": vblora_vector_length},
    }


def vblora_vector_length(model) -> int:
    """The largest vector length up to PEFT's default that divides every adapted layer's width."""
    widths = [
        size
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
        for size in (module.in_features, module.out_features)
    ]
    common = math.gcd(*widths)
    return max(d for d in range(1, min(common, VBLORA_VECTOR_LENGTH) + 1) if common % d == 0)


def accuracy(result: TaskResult) -> float:
    return float(result.metrics[ACCURACY_METRIC])


def fine_tune_sharelora(run: Run, cfg: Recipe) -> Row:
    """`sharelora train`, then the GSM8K evaluator on the saved adapter."""
    summary = train(cfg)
    result = gsm8k.evaluate(build_engine(cfg, Path(cfg.output_dir) / "adapter"), cfg.eval.gsm8k, None)
    step_time = summary.seconds / summary.steps
    return Row(run.method, run.rank, run.seed, accuracy(result), summary.trainable_parameters, step_time)


def fine_tune_peft_lora(run: Run, cfg: Recipe) -> Row:
    """PEFT's LoRA, trained by sharelora's own step function on the same batches, scored the same way."""
    from peft import LoraConfig, get_peft_model

    train_cfg = cfg.train
    # This loop logs nothing, so it starts no tracker.
    accelerator = make_accelerator(train_cfg.model_copy(update={"report_to": []}), Path(cfg.output_dir))
    set_seed(train_cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    splits = build_splits(cfg.data, tokenizer, train_cfg.seed)
    model = load_model(cfg.model, cfg.quantization, accelerator.device)
    adapter = cfg.adapter
    lora = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=0.0, target_modules=adapter.targets)
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = make_scheduler(train_cfg.scheduler, optimizer, train_cfg.warmup_steps, train_cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    sampler = StepSampler(len(splits.train), train_cfg.batch_size, 1, 1, 0, train_cfg.seed)
    clipped = SimpleNamespace(parameters=lambda: params)  # what train_step clips
    seconds = 0.0
    for step in range(train_cfg.max_steps):
        started = time.perf_counter()
        micro = [[splits.train[i] for i in idx] for idx in sampler.micro_batches(step)]
        batches = [collate(examples, tokenizer.pad_token_id) for examples in micro]
        train_step(model, batches, clipped, optimizer, scheduler, accelerator, train_cfg, step, [])
        seconds += time.perf_counter() - started
    engine = Engine(model, tokenizer, cfg.eval.batch_size, context_window(model, None))
    result = gsm8k.evaluate(engine, cfg.eval.gsm8k, None)
    trainable = sum(p.numel() for p in params)
    return Row(run.method, run.rank, run.seed, accuracy(result), trainable, seconds / train_cfg.max_steps)


# Study name -> fine-tune function. Every sharelora method is one; outside references are added here.
TRAINERS: dict[str, Callable[[Run, Recipe], Row]] = {
    **dict.fromkeys(METHOD_NAMES, fine_tune_sharelora),
    "peft-lora": fine_tune_peft_lora,
}


def trainable_count(model, method: str, rank: int, vector_length: int) -> int:
    """Trainable parameters at the end of training (ASLoRA: after its merges), counted on the meta device."""
    config = AdapterConfig(**adapter_settings(method, rank, vector_length))
    plan = planned_plan(model, config)
    return plan_trainable(config, target_plan(plan, config.aslora) if method == "aslora" else plan)


def matched_rank(model, method: str, lora_rank: int, vector_length: int) -> int:
    """The rank whose trainable count is closest to LoRA's at lora_rank (the smaller rank on a tie)."""
    budget = trainable_count(model, "lora", lora_rank, vector_length)

    def distance(rank: int) -> tuple[int, int]:
        return abs(trainable_count(model, method, rank, vector_length) - budget), rank

    return min(range(1, 16 * lora_rank + 1), key=distance)


def plan_runs(
    model, vector_length: int, methods: list[str], ranks: list[int], match_lora_ranks: list[int], seeds: list[int]
) -> list[Run]:
    """model: the base on the meta device, for the parameter counts of the equal-budget sweep."""
    pairs = {(m, r) for m in methods for r in ranks}
    pairs |= {(m, matched_rank(model, m, lora_rank, vector_length)) for m in methods for lora_rank in match_lora_ranks}
    order = {m: i for i, m in enumerate(methods)}
    return [Run(m, r, s) for m, r in sorted(pairs, key=lambda p: (order[p[0]], p[1])) for s in seeds]


def run_once(run: Run, settings: Settings) -> tuple[Row, bool]:
    """The run's row, and whether it was reused from an earlier study rather than run now."""
    row, reused = finished_or_run(
        settings.out / run.name, lambda: asdict(TRAINERS[run.method](run, recipe(run, settings)))
    )
    return Row(**row), reused


def base_accuracy(settings: Settings) -> float:
    """The base model without an adapter, on the same held-out problems."""
    cfg = recipe(Run("lora", 1, 0), settings)
    return accuracy(gsm8k.evaluate(build_engine(cfg, None), cfg.eval.gsm8k, None))


def summarise(rows: list[Row]) -> list[dict]:
    """One entry per (method, rank): accuracy mean and sample std over seeds, parameters, mean step time."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.rank), []).append(row)
    return [{
        "method": method, "rank": rank, "seeds": len(group), "trainable_params": group[0].trainable_params,
        "mean": statistics.mean(r.accuracy for r in group),
        "std": statistics.stdev(r.accuracy for r in group) if len(group) > 1 else 0.0,
        "step_time_s": statistics.mean(r.step_time_s for r in group),
    } for (method, rank), group in groups.items()]  # fmt: skip


def percent(entry: dict) -> str:
    return f"{100 * entry['mean']:.1f}% ± {100 * entry['std']:.1f}"


def markdown(summary: list[dict], lora_ranks: list[int], base: float, command: str, setup: str) -> str:
    lora = {s["rank"]: s["trainable_params"] for s in summary if s["method"] == "lora"}
    lines = [
        f"Command: `{command}`",
        "",
        setup,
        "",
        f"Base model without an adapter: {100 * base:.1f}% on the same problems.",
        "",
        "| method | rank | trainable params | vs LoRA same rank | accuracy (mean ± std) | seeds | step time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        ratio = f"{s['trainable_params'] / lora[s['rank']]:.0%}" if s["rank"] in lora else "–"
        lines.append(
            f"| {s['method']} | {s['rank']} | {s['trainable_params']:,} | {ratio} | {percent(s)} | {s['seeds']} | "
            f"{s['step_time_s']:.3f} |"
        )
    for lora_rank in (r for r in lora_ranks if r in lora):
        budget = lora[lora_rank]
        matched = [s for s in summary if abs(s["trainable_params"] - budget) <= 0.1 * budget]
        lines += [
            "",
            f"Equal parameter budget: every run within 10% of LoRA r={lora_rank}'s {budget:,} trainable parameters.",
            "",
            "| method | rank | trainable params | accuracy (mean ± std) |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {s['method']} | {s['rank']} | {s['trainable_params']:,} | {percent(s)} |"
            for s in sorted(matched, key=lambda s: -s["mean"])
        ]
    return "\n".join(lines)


def write_markdown(path: Path, section: str, plot: Path | None) -> None:
    """Replace the study section of path (between the markers), keeping the text around it."""
    if plot is not None:
        section += f"\n\n![held-out accuracy against trainable parameters]({os.path.relpath(plot, path.parent)})"
    replace_section(path, SECTION, section, "Method study")


def write_plot(path: Path, summary: list[dict], base: float) -> bool:
    """Accuracy against trainable parameters (log x), one line per method through its ranks, std as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(s["method"] for s in summary):
        points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["trainable_params"])
        x = [s["trainable_params"] for s in points]
        y, spread = [100 * s["mean"] for s in points], [100 * s["std"] for s in points]
        ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=method)
        for s, xy in zip(points, zip(x, y)):
            ax.annotate(f"r{s['rank']}", xy, textcoords="offset points", xytext=(4, -10), fontsize=7)
    # The base scores far below every adapter; drawing it would squeeze the differences into a sliver.
    lowest = min(100 * (s["mean"] - s["std"]) for s in summary)
    title = f"Word problems after fine-tuning, mean ± std over seeds (base without adapter: {100 * base:.1f}%)"
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="held-out accuracy (%)", ylim=(max(0, lowest - 5), 100))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def describe_setup(settings: Settings, seeds: list[int], timing: str, load: tuple[float, float]) -> str:
    pretraining = json.loads((Path(settings.base) / "pretraining.json").read_text())
    steps, seed = pretraining["config"]["steps"], pretraining["config"]["seed"]
    return (
        f"Base: `{settings.base}` ({pretraining['parameters']:,} parameters, pretrained {steps} steps, seed {seed}). "
        f"Each run: {settings.steps} steps of batch {settings.batch_size}, lr {settings.lr}, cosine schedule, "
        f"alpha = 2 x rank, all seven projections, seeds {', '.join(map(str, seeds))}. {timing} "
        f"on {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); "
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (the cores were shared, so step times "
        "are indicative only)."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/method-study"), help="one folder per run; finished runs are reused"
    )
    parser.add_argument(
        "--json", type=Path, help="write the rows {method, rank, seed, accuracy, trainable_params, step_time_s}"
    )
    parser.add_argument("--markdown", type=Path, default=Path("docs/method_study.md"), help="update its study section")
    parser.add_argument("--plot", type=Path, default=Path("docs/method_study.png"))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from: {', '.join(TRAINERS)}")
    parser.add_argument("--ranks", type=whole_numbers, default="2,8,32", help="comma-separated")
    parser.add_argument(
        "--match-lora-ranks",
        type=whole_numbers,
        default="2,8",
        help="also run each method at the rank closest to LoRA r=N's parameter count, for each N; 0: none",
    )
    parser.add_argument("--seeds", type=whole_numbers, default="0,1,2", help="comma-separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument(
        "--base", default="artifacts/tiny-llama-arith", help="built by scripts/make_tiny_model.py --pretrain"
    )
    parser.add_argument(
        "--tasks", default="artifacts/synthetic-tasks", help=f"folder holding {FINE_TUNING_SKILL}/{{train,test}}.jsonl"
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in TRAINERS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(TRAINERS)}")
    if 0 in args.ranks:
        parser.error("--ranks: a rank must be positive")
    args.match_lora_ranks = [r for r in args.match_lora_ranks if r > 0]
    if not (Path(args.base) / "pretraining.json").is_file():
        parser.error(f"--base {args.base} is not a pretrained base: run python scripts/make_tiny_model.py --pretrain")
    if not (Path(args.tasks) / FINE_TUNING_SKILL / "test.jsonl").is_file():
        parser.error(
            f"--tasks {args.tasks} has no {FINE_TUNING_SKILL}/test.jsonl: "
            "run python scripts/make_tiny_model.py --pretrain"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    model = build_on_meta(load_config(args.base))
    vector_length = vblora_vector_length(model)
    settings = Settings(args.base, args.tasks, args.steps, args.batch_size, args.lr, args.out, vector_length)
    runs = plan_runs(model, vector_length, args.methods, args.ranks, args.match_lora_ranks, args.seeds)
    rows, timing = run_all(
        runs,
        lambda run: run_once(run, settings),
        lambda row: f"accuracy {row.accuracy:.3f}, {row.trainable_params:,} trainable, {row.step_time_s:.3f} s/step",
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    summary = summarise(rows)
    base = base_accuracy(settings)
    setup = describe_setup(settings, args.seeds, timing, (load_start, os.getloadavg()[0]))
    command = "python scripts/method_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    plotted = write_plot(args.plot, summary, base)
    section = markdown(summary, args.match_lora_ranks, base, command, setup)
    write_markdown(args.markdown, section, args.plot if plotted else None)
    print(
        f"tables written to {args.markdown}"
        + (f", plot to {args.plot}" if plotted else "; no plot: matplotlib is missing (pip install -e .[plots])")
    )


if __name__ == "__main__":
    main()
