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

--depth-study is the study where depth matters, on the 12-layer base of
`scripts/make_tiny_model.py --pretrain artifacts/tiny-llama-arith-deep --layers 12 --hidden 64`:

    .venv/bin/python scripts/method_study.py --depth-study --json docs/method_study_deep.json

Every method of sharelora's registry is held to LoRA's trainable count at each --budgets rank by turning its
size knob (adapters/size_knobs.py) to the value nearest it; a method more than 10% off says so in the table.
Each (method, budget) sweeps --lrs (or that budget's --lrs-at) on the first seed, scored on the last
--validation-size training problems (which no run trains on), keeps the lr with the best validation accuracy,
and runs every seed at it, scored on the test problems. Step time (mean) and peak memory (median; RSS
high-water mark over training above the process's RSS before it; on CUDA the allocator's peak) come from the
runs at the chosen lr.

A finished run leaves row.json in its folder under --out and is reused when the study is run again, so an
interrupted study continues where it stopped. Studies of disjoint --methods or --budgets may run side by side
on the same --out; --finished-only then writes the tables of every (method, budget) whose runs have all
finished, training nothing, and names the ones left out. Writes --json (one row per run), the Markdown tables between
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

from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.adapters.size_knobs import final_trainable, knob_of, nearest_value, with_knob
from sharelora_cli.config.recipe import METHOD_NAMES, AdapterConfig, Recipe, validate
from sharelora_cli.core.doc_sections import replace_section
from sharelora_cli.core.lr_schedule import make_scheduler
from sharelora_cli.core.peak_memory import PeakMeter
from sharelora_cli.core.study_runs import ROW_FILE, finished_or_run, run_all, whole_numbers
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
BASE, DEEP_BASE = "artifacts/tiny-llama-arith", "artifacts/tiny-llama-arith-deep"


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
    # What every run fine-tunes on: the skill's train.jsonl, or (depth study) its part left after the validation rows.
    train_file: str


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
    adapter = adapter_settings(run.method, run.rank, settings.vblora_vector_length)
    return study_recipe(settings, adapter, settings.lr, run.seed, run.name)


def study_recipe(settings: Settings, adapter: dict, lr: float, seed: int, name: str) -> Recipe:
    """A run of either study: everything but the adapter, the learning rate and the seed is the study's."""
    return validate({
        "model": {"name_or_path": settings.base},
        "adapter": adapter,
        "data": {"path": settings.train_file, "max_length": 128, "validation_fraction": 0.0},
        "train": {"max_steps": settings.steps, "batch_size": settings.batch_size, "lr": lr,
                  "warmup_steps": settings.steps // 15, "scheduler": "cosine", "seed": seed,
                  "log_every": settings.steps, "eval_every": settings.steps, "checkpoint_every": settings.steps},
        "eval": {"tasks": ["gsm8k"], "batch_size": 64,
                 "gsm8k": {"path": f"{settings.tasks}/{FINE_TUNING_SKILL}", "num_fewshot": 0, "max_new_tokens": 48}},
        "output_dir": str(settings.out / name),
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
    return final_trainable(model, AdapterConfig(**adapter_settings(method, rank, vector_length)))


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
        "method": method, "rank": rank, "label": f"r{rank}", "seeds": len(group),
        "trainable_params": group[0].trainable_params,
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


def write_markdown(path: Path, name: str, section: str, plot: Path | None) -> None:
    """Replace the study's section of path (between name's markers), keeping the text around it."""
    if plot is not None:
        section += f"\n\n![held-out accuracy against trainable parameters]({os.path.relpath(plot, path.parent)})"
    replace_section(path, name, section, "Method study")


def write_plot(path: Path, summary: list[dict], base: float, annotate: bool = True) -> bool:
    """Accuracy against trainable parameters (log x), one line per method through its sizes, std as error bars.

    annotate labels each point with its size (the depth study's points crowd at each budget: its tables say them).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    # A colour and a marker each, so that thirteen methods stay apart (the default cycle has ten colours).
    pairs = plt.get_cmap("tab20").colors  # (dark, light) pairs: the ten dark colours first
    colours, markers = [*pairs[0::2], *pairs[1::2]], "osD^vP*Xh<>p8"
    for i, method in enumerate(dict.fromkeys(s["method"] for s in summary)):
        points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["trainable_params"])
        x = [s["trainable_params"] for s in points]
        y, spread = [100 * s["mean"] for s in points], [100 * s["std"] for s in points]
        style = {"marker": markers[i % len(markers)], "color": colours[i % len(colours)]}
        ax.errorbar(x, y, yerr=spread, capsize=3, label=method, **style)
        for s, xy in zip(points, zip(x, y) if annotate else ()):
            ax.annotate(s["label"], xy, textcoords="offset points", xytext=(4, -10), fontsize=7)
    # The base scores far below every adapter; drawing it would squeeze the differences into a sliver.
    lowest = min(100 * (s["mean"] - s["std"]) for s in summary)
    title = f"Word problems after fine-tuning, mean ± std over seeds (base without adapter: {100 * base:.1f}%)"
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="held-out accuracy (%)", ylim=(max(0, lowest - 5), 100))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # Beside the axes: inside, it hides whichever points fall under it.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def describe_setup(settings: Settings, seeds: list[int], timing: str, load: tuple[float, float]) -> str:
    return (
        f"{describe_base(settings.base)} "
        f"Each run: {settings.steps} steps of batch {settings.batch_size}, lr {settings.lr}, cosine schedule, "
        f"alpha = 2 x rank, all seven projections, seeds {', '.join(map(str, seeds))}. {describe_machine(timing, load)}"
    )


def describe_base(base: str) -> str:
    pretraining = json.loads((Path(base) / "pretraining.json").read_text())
    config = pretraining["config"]
    return (
        f"Base: `{base}` ({pretraining['parameters']:,} parameters, {config['layers']} layers of hidden "
        f"{config['hidden']}, pretrained {config['steps']} steps, seed {config['seed']})."
    )


def describe_machine(timing: str, load: tuple[float, float]) -> str:
    return (
        f"{timing} on {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op "
        f"thread(s); load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (the cores were shared, so "
        "step times are indicative only)."
    )


# ---------------------------------------------------------------- the depth study (--depth-study)

DEPTH_SECTION = "method-study-deep"
# LoRA rank (the budget) -> the lr grid every method is swept over at that budget.
Grids = dict[int, list[float]]
# A method's count within this share of LoRA's is "at LoRA's budget" (the 3-layer study's equal-budget rule).
NEAR_BUDGET = 0.1


@dataclass(frozen=True)
class Cell:
    """One method held to LoRA's trainable count at one rank, by its size knob."""

    method: str
    lora_rank: int
    knob: str
    value: int
    trainable_params: int
    budget: int

    @property
    def near(self) -> bool:
        return abs(self.trainable_params - self.budget) <= NEAR_BUDGET * self.budget


@dataclass(frozen=True)
class DepthRun:
    cell: Cell
    lr: float
    seed: int

    @property
    def name(self) -> str:
        knob = self.cell.knob.rsplit(".", 1)[-1]
        return f"{self.cell.method}-lora{self.cell.lora_rank}-{knob}{self.cell.value}-lr{self.lr:g}-s{self.seed}"


@dataclass
class DepthRow:
    """A trained run; validation_accuracy for the lr sweep (first seed), accuracy (test) once the lr is chosen."""

    method: str
    lora_rank: int
    knob: str
    value: int
    lr: float
    seed: int
    trainable_params: int
    step_time_s: float
    peak_memory_bytes: int
    validation_accuracy: float | None = None
    accuracy: float | None = None


def depth_adapter(method: str, lora_rank: int, value: int, vector_length: int) -> dict:
    """The adapter section with the method's size knob at value; a method sized by a knob of its own keeps LoRA's rank."""
    knob = knob_of(method)
    if knob.path == "rank":
        return adapter_settings(method, value, vector_length)
    return with_knob(adapter_settings(method, lora_rank, vector_length), knob, value)


def plan_cells(model, vector_length: int, methods: list[str], lora_ranks: list[int]) -> list[Cell]:
    """Every method at the knob value whose trainable count is nearest LoRA's at each rank."""
    budgets = {rank: trainable_count(model, "lora", rank, vector_length) for rank in lora_ranks}
    return [plan_cell(model, vector_length, m, rank, budgets[rank]) for rank in lora_ranks for m in methods]


def plan_cell(model, vector_length: int, method: str, lora_rank: int, budget: int) -> Cell:
    def count(value: int) -> int:
        return final_trainable(model, AdapterConfig(**depth_adapter(method, lora_rank, value, vector_length)))

    value = nearest_value(count, knob_of(method), budget)
    return Cell(method, lora_rank, knob_of(method).path, value, count(value), budget)


def write_validation_split(tasks: str, out: Path, size: int) -> Path:
    """out/validation/{train,test}.jsonl: the skill's training rows less their last size, which are the test here.

    The learning rate is chosen on these rows; the held-out test problems are never seen before the choice.
    """
    rows = (Path(tasks) / FINE_TUNING_SKILL / "train.jsonl").read_text().splitlines(keepends=True)
    if size >= len(rows):
        raise SystemExit(f"error: --validation-size {size} leaves no training rows of the {len(rows)} in {tasks}")
    folder = out / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    write_if_changed(folder / "train.jsonl", "".join(rows[:-size]))
    write_if_changed(folder / "test.jsonl", "".join(rows[-size:]))
    return folder


def write_if_changed(path: Path, text: str) -> None:
    """Studies of other budgets may run beside this one on the same --out: never rewrite a file they may be reading."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def depth_recipe(run: DepthRun, settings: Settings) -> Recipe:
    cell = run.cell
    adapter = depth_adapter(cell.method, cell.lora_rank, cell.value, settings.vblora_vector_length)
    return study_recipe(settings, adapter, run.lr, run.seed, run.name)


def train_depth_run(run: DepthRun, settings: Settings, validation: Path | None) -> DepthRow:
    """Fine-tune, measuring peak memory over training; score the validation rows when given (the lr sweep)."""
    cell, cfg = run.cell, depth_recipe(run, settings)
    meter = PeakMeter("cuda" if torch.cuda.is_available() else "cpu")
    summary = train(cfg)
    peak = meter.peak()
    row = DepthRow(
        cell.method, cell.lora_rank, cell.knob, cell.value, run.lr, run.seed, summary.trainable_parameters,
        summary.seconds / summary.steps, peak,
    )  # fmt: skip
    if validation is not None:
        row.validation_accuracy = score(cfg, str(validation))
    return row


def score(cfg: Recipe, path: str) -> float:
    """The saved adapter's strict-match accuracy on path's test.jsonl."""
    task = cfg.eval.gsm8k.model_copy(update={"path": path})
    return accuracy(gsm8k.evaluate(build_engine(cfg, Path(cfg.output_dir) / "adapter"), task, None))


def swept(run: DepthRun, settings: Settings, validation: Path) -> tuple[DepthRow, bool]:
    """A run of the lr sweep: trained and scored on the validation rows only."""
    row, reused = finished_or_run(settings.out / run.name, lambda: asdict(train_depth_run(run, settings, validation)))
    return DepthRow(**row), reused


def tested(run: DepthRun, settings: Settings, swept_row: DepthRow | None) -> tuple[DepthRow, bool]:
    """A run at its cell's chosen lr, scored on the test problems; the first seed's is the sweep's own run."""
    trained_before = True
    if swept_row is None:
        row, trained_before = finished_or_run(
            settings.out / run.name, lambda: asdict(train_depth_run(run, settings, None))
        )
        swept_row = DepthRow(**row)
    cfg = depth_recipe(run, settings)
    test, scored_before = finished_or_run(
        settings.out / run.name / "test", lambda: {"accuracy": score(cfg, f"{settings.tasks}/{FINE_TUNING_SKILL}")}
    )
    return DepthRow(**{**asdict(swept_row), **test}), trained_before and scored_before


def finished_cells(cells: list[Cell], settings: Settings, grids: Grids, seeds: list[int]) -> list[Cell]:
    """The cells whose sweep and every seed at the chosen lr have finished under settings.out (--finished-only)."""

    def finished(run: DepthRun, scored: bool) -> bool:
        folder = settings.out / run.name
        return (folder / ROW_FILE).is_file() and (not scored or (folder / "test" / ROW_FILE).is_file())

    def complete(cell: Cell) -> bool:
        sweep = [DepthRun(cell, lr, seeds[0]) for lr in grids[cell.lora_rank]]
        if not all(finished(run, False) for run in sweep):
            return False
        lr = chosen_lr([DepthRow(**json.loads((settings.out / run.name / ROW_FILE).read_text())) for run in sweep])
        return all(finished(DepthRun(cell, lr, seed), True) for seed in seeds)

    return [cell for cell in cells if complete(cell)]


def chosen_lr(sweep: list[DepthRow]) -> float:
    """The lr with the best validation accuracy (the smaller lr on a tie)."""
    return max(sweep, key=lambda row: (row.validation_accuracy, -row.lr)).lr


def run_depth_study(cells: list[Cell], settings: Settings, grids: Grids, seeds: list[int], validation: Path):
    """The lr sweep of every cell on the first seed, then every seed at each cell's chosen lr."""

    def describe(row: DepthRow) -> str:
        scores = f"validation {row.validation_accuracy:.3f}" if row.accuracy is None else f"test {row.accuracy:.3f}"
        return f"{scores}, {row.trainable_params:,} trainable, {row.step_time_s:.3f} s/step"

    sweep_runs = [DepthRun(cell, lr, seeds[0]) for cell in cells for lr in grids[cell.lora_rank]]
    sweep, sweep_timing = run_all(sweep_runs, lambda run: swept(run, settings, validation), describe)
    by_run = dict(zip(sweep_runs, sweep))
    lr_of = {cell: chosen_lr([by_run[DepthRun(cell, lr, seeds[0])] for lr in grids[cell.lora_rank]]) for cell in cells}
    final_runs = [DepthRun(cell, lr_of[cell], seed) for cell in cells for seed in seeds]
    final, final_timing = run_all(final_runs, lambda run: tested(run, settings, by_run.get(run)), describe)
    chosen = set(final_runs)
    rows = [row for run, row in zip(sweep_runs, sweep) if run not in chosen] + final
    return rows, f"lr sweep: {sweep_timing}; chosen lr: {final_timing}"


def summarise_depth(rows: list[DepthRow], cells: list[Cell], seeds: list[int]) -> list[dict]:
    """One entry per cell: the lr sweep's validation accuracies, and test accuracy, time and memory at the chosen lr."""
    summary = []
    for cell in cells:
        mine = [r for r in rows if (r.method, r.lora_rank) == (cell.method, cell.lora_rank)]
        final = [r for r in mine if r.accuracy is not None]
        tested_scores = [r.accuracy for r in final if r.accuracy is not None]
        summary.append({
            **asdict(cell), "near": cell.near, "label": f"{cell.knob.rsplit('.', 1)[-1]} {cell.value}",
            "validation": dict(sorted((r.lr, r.validation_accuracy) for r in mine if r.seed == seeds[0])),
            "lr": final[0].lr, "seeds": len(final), "mean": statistics.mean(tested_scores),
            "std": statistics.stdev(tested_scores) if len(final) > 1 else 0.0,
            "step_time_s": statistics.mean(r.step_time_s for r in final),
            # The median: the first run of a process also pays one-off allocations (about 120 MiB on the deep base).
            "peak_memory_bytes": int(statistics.median(r.peak_memory_bytes for r in final)),
        })  # fmt: skip
    return summary


def verdict(entry: dict, lora: dict | None) -> str:
    """Against LoRA at the same budget: a win or a loss only where the means differ by more than both stds together."""
    if not entry["near"]:
        return f"not at the budget ({entry['trainable_params'] / entry['budget'] - 1:+.0%})"
    if lora is None or entry["method"] == "lora":
        return "–"
    gap, spread = entry["mean"] - lora["mean"], entry["std"] + lora["std"]
    return "beats LoRA" if gap > spread else "loses to LoRA" if -gap > spread else "within the seed spread"


def depth_markdown(summary: list[dict], base: float, command: str, setup: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        setup,
        "",
        f"Base model without an adapter: {100 * base:.1f}% on the test problems.",
    ]
    for lora_rank in sorted({s["lora_rank"] for s in summary}):
        cell = [s for s in summary if s["lora_rank"] == lora_rank]
        lora = next((s for s in cell if s["method"] == "lora"), None)
        lines += [
            "",
            f"LoRA r={lora_rank}'s budget: {cell[0]['budget']:,} trainable parameters.",
            "",
            "| method | size knob | trainable params | lr chosen (validation accuracy per lr) | test accuracy (mean ± std) "
            "| against LoRA | step time (s) | peak memory (MiB) |",
            "| --- | --- | ---: | --- | ---: | --- | ---: | ---: |",
        ]
        for s in cell:
            sweep = ", ".join(f"{lr:g}: {100 * acc:.1f}%" for lr, acc in s["validation"].items())
            lines.append(
                f"| {s['method']} | {s['label']} | {s['trainable_params']:,} | **{s['lr']:g}** ({sweep}) | {percent(s)} "
                f"| {verdict(s, lora)} | {s['step_time_s']:.3f} | {s['peak_memory_bytes'] / 2**20:.0f} |"
            )
        for outcome in ("beats LoRA", "loses to LoRA"):
            names = [s["method"] for s in cell if verdict(s, lora) == outcome]
            lines += ["", f"{outcome.capitalize()} by more than the seed spread: {', '.join(names) or 'none'}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--depth-study",
        action="store_true",
        help="every registered method at LoRA's budgets on the deep base, lr chosen per method on validation rows",
    )
    parser.add_argument(
        "--out", type=Path, help="one folder per run; finished runs are reused [runs/method-study(-deep)]"
    )
    parser.add_argument("--json", type=Path, help="write one row per run")
    parser.add_argument("--markdown", type=Path, default=Path("docs/method_study.md"), help="update its study section")
    parser.add_argument("--plot", type=Path, help="[docs/method_study(_deep).png]")
    parser.add_argument("--methods", help=f"from: {', '.join(TRAINERS)} [depth study: every registered method]")
    parser.add_argument("--ranks", type=whole_numbers, default="2,8,32", help="comma-separated")
    parser.add_argument(
        "--match-lora-ranks",
        type=whole_numbers,
        default="2,8",
        help="also run each method at the rank closest to LoRA r=N's parameter count, for each N; 0: none",
    )
    parser.add_argument("--seeds", type=whole_numbers, default="0,1,2", help="comma-separated")
    parser.add_argument("--steps", type=int, help="training steps per run [200; depth study: 100]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    depth = parser.add_argument_group("depth study")
    depth.add_argument(
        "--budgets",
        type=whole_numbers,
        default="1,2,8",
        help="LoRA ranks whose trainable counts every method is held to",
    )
    depth.add_argument(
        "--lrs",
        type=learning_rates,
        default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1",
        help="the grid every method is swept over",
    )
    depth.add_argument(
        "--lrs-at",
        type=budget_grid,
        action="append",
        default=[],
        metavar="RANK=LRS",
        help="another grid at one budget, every method alike there: 8=3e-3,1e-2 (repeatable)",
    )
    depth.add_argument(
        "--validation-size", type=int, default=200, help="training problems held out to choose the lr on"
    )
    depth.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: the tables of the (method, budget) pairs whose runs have all finished under --out, "
        "the others named as left out (a study cut short, or run in parts beside each other)",
    )
    parser.add_argument("--base", help=f"built by scripts/make_tiny_model.py --pretrain [{BASE} or {DEEP_BASE}]")
    parser.add_argument(
        "--tasks", default="artifacts/synthetic-tasks", help=f"folder holding {FINE_TUNING_SKILL}/{{train,test}}.jsonl"
    )
    args = parser.parse_args(argv)
    fill_defaults(args)
    check_args(parser, args)
    return args


def learning_rates(text: str) -> list[float]:
    """--lrs: "1e-3,3e-3" -> [0.001, 0.003] (sorted, without repeats), every one positive."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}") from None
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive learning rates, got {text!r}")
    return values


def budget_grid(text: str) -> tuple[int, list[float]]:
    """--lrs-at: "8=3e-3,1e-2" -> (8, [0.003, 0.01])."""
    rank, sep, lrs = text.partition("=")
    if not sep or not rank.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected RANK=LR,LR,... (a budget's grid), got {text!r}")
    return int(rank), learning_rates(lrs)


def fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that differ between the 3-layer study and the depth study."""
    deep = args.depth_study
    args.out = args.out or Path("runs/method-study-deep" if deep else "runs/method-study")
    args.plot = args.plot or Path("docs/method_study_deep.png" if deep else "docs/method_study.png")
    args.base = args.base or (DEEP_BASE if deep else BASE)
    # The depth study's grid is 390 runs: 100 steps keep it to a few core-hours on a CPU.
    if args.steps is None:
        args.steps = 100 if deep else 200
    methods = args.methods or ",".join(METHODS if deep else DEFAULT_METHODS)
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    known = METHODS if args.depth_study else TRAINERS
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if 0 in args.ranks or 0 in args.budgets:
        parser.error(f"--{'budgets' if 0 in args.budgets else 'ranks'}: a rank must be positive")
    if args.validation_size <= 0:
        parser.error(f"--validation-size must be a positive integer, got {args.validation_size}")
    args.match_lora_ranks = [r for r in args.match_lora_ranks if r > 0]
    stray = sorted({rank for rank, _ in args.lrs_at} - set(args.budgets))
    if stray:
        parser.error(f"--lrs-at: LoRA r={stray[0]} is not one of --budgets {','.join(map(str, args.budgets))}")
    # Each budget's lr grid: its --lrs-at, else --lrs.
    args.grids = {rank: dict(args.lrs_at).get(rank, args.lrs) for rank in args.budgets}
    layers = "" if args.base != DEEP_BASE else f" {DEEP_BASE} --layers 12 --hidden 64"
    if not (Path(args.base) / "pretraining.json").is_file():
        parser.error(
            f"--base {args.base} is not a pretrained base: run python scripts/make_tiny_model.py --pretrain{layers}"
        )
    if not (Path(args.tasks) / FINE_TUNING_SKILL / "test.jsonl").is_file():
        parser.error(
            f"--tasks {args.tasks} has no {FINE_TUNING_SKILL}/test.jsonl: "
            "run python scripts/make_tiny_model.py --pretrain"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    model = build_on_meta(load_config(args.base))
    vector_length = vblora_vector_length(model)
    command = "python scripts/method_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.depth_study:
        depth_main(args, model, vector_length, command, load_start)
        return
    train_file = f"{args.tasks}/{FINE_TUNING_SKILL}/train.jsonl"
    settings = Settings(
        args.base, args.tasks, args.steps, args.batch_size, args.lr, args.out, vector_length, train_file
    )
    runs = plan_runs(model, vector_length, args.methods, args.ranks, args.match_lora_ranks, args.seeds)
    rows, timing = run_all(
        runs,
        lambda run: run_once(run, settings),
        lambda row: f"accuracy {row.accuracy:.3f}, {row.trainable_params:,} trainable, {row.step_time_s:.3f} s/step",
    )
    write_json(args.json, [asdict(row) for row in rows])
    summary = summarise(rows)
    base = base_accuracy(settings)
    setup = describe_setup(settings, args.seeds, timing, (load_start, os.getloadavg()[0]))
    plotted = write_plot(args.plot, summary, base)
    write_markdown(
        args.markdown,
        SECTION,
        markdown(summary, args.match_lora_ranks, base, command, setup),
        args.plot if plotted else None,
    )
    report_written(args.markdown, args.plot, plotted)


def depth_main(args: argparse.Namespace, model, vector_length: int, command: str, load_start: float) -> None:
    """The depth study: cells planned on the meta model, the lr sweep on validation rows, then the seeds on test."""
    validation = write_validation_split(args.tasks, args.out, args.validation_size)
    train_file = str(validation / "train.jsonl")
    # Each run takes its lr from the sweep; settings.lr only fills the recipe that scores the base alone.
    settings = Settings(
        args.base, args.tasks, args.steps, args.batch_size, args.lr, args.out, vector_length, train_file
    )
    planned = plan_cells(model, vector_length, args.methods, args.budgets)
    cells = finished_cells(planned, settings, args.grids, args.seeds) if args.finished_only else planned
    if not cells:
        print(
            f"error: --finished-only: no (method, budget) has finished all its runs under {args.out}", file=sys.stderr
        )
        sys.exit(2)
    rows, timing = run_depth_study(cells, settings, args.grids, args.seeds, validation)
    write_json(args.json, [asdict(row) for row in rows])
    summary = summarise_depth(rows, cells, args.seeds)
    base = base_accuracy(settings)
    setup = describe_depth_setup(settings, args, timing, (load_start, os.getloadavg()[0]))
    setup += left_out([cell for cell in planned if cell not in cells])
    plotted = write_plot(args.plot, summary, base, annotate=False)
    write_markdown(
        args.markdown, DEPTH_SECTION, depth_markdown(summary, base, command, setup), args.plot if plotted else None
    )
    report_written(args.markdown, args.plot, plotted)


def describe_depth_setup(settings: Settings, args: argparse.Namespace, timing: str, load: tuple[float, float]) -> str:
    seeds = ", ".join(map(str, args.seeds))
    return (
        f"{describe_base(settings.base)} Each run: {settings.steps} steps of batch {settings.batch_size}, cosine "
        f"schedule, alpha = 2 x rank, all seven projections, on the skill's training problems less the last "
        f"{args.validation_size}. The lr of each method at each budget: the best accuracy on those "
        f"{args.validation_size} held-out training problems over lrs {grid_text(args.lrs)}{other_grids(args)} "
        f"(seed {args.seeds[0]}); then seeds {seeds} at that lr, scored on the test problems. "
        f"{describe_machine(timing, load)}"
    )


def grid_text(lrs: list[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in lrs)


def other_grids(args: argparse.Namespace) -> str:
    """The budgets swept over another grid (--lrs-at), every method alike."""
    others = [f"at LoRA r={rank}'s budget over {grid_text(lrs)}" for rank, lrs in sorted(args.lrs_at)]
    return f" ({'; '.join(others)}, every method alike)" if others else ""


def left_out(cells: list[Cell]) -> str:
    """The planned cells that --finished-only left out, by budget."""
    budgets = sorted({cell.lora_rank for cell in cells})
    return "".join(
        f" Not finished, so not in the tables (--finished-only), at LoRA r={rank}'s budget: "
        + ", ".join(cell.method for cell in cells if cell.lora_rank == rank)
        + "."
        for rank in budgets
    )


def write_json(path: Path | None, rows: list[dict]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")


def report_written(markdown_path: Path, plot: Path, plotted: bool) -> None:
    print(
        f"tables written to {markdown_path}"
        + (f", plot to {plot}" if plotted else "; no plot: matplotlib is missing (pip install -e .[plots])")
    )


if __name__ == "__main__":
    main()
