"""Continual study: adapter methods taken through the stages of a continual recipe, over several seeds.

    .venv/bin/python scripts/continual_study.py --json docs/continual.json

Each run is `sharelora train RECIPE adapter.method=M train.seed=S output_dir=OUT/M-sS` (plus any --override):
the recipe's stages in order, each continuing the adapter of the stage before, and every stage's tasks
scored before the first stage and after each one (continual.json). Only the method and the seed change
between runs, so every method gets the same data, steps, learning rate and rank; nothing is tuned per method.

Writes --json (one row per run: method, rank, seed, trainable_params and the run's continual.json) and, between
the study markers of --markdown, per method the accuracy matrix averaged over seeds and the mean ± std of
average accuracy, backward transfer and forgetting. A finished run leaves row.json in its folder and is
reused when the study is run again, so an interrupted study continues where it stopped.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from sharelora_cli.config.recipe import METHOD_NAMES, Recipe, load_recipe, stage_name
from sharelora_cli.core.doc_sections import replace_section
from sharelora_cli.core.errors import UserError
from sharelora_cli.core.study_runs import finished_or_run, run_all, whole_numbers
from sharelora_cli.training.loop import SUMMARY_FILE
from sharelora_cli.training.stages import run_stages, stage_dir

DEFAULT_METHODS = ["lora", "sharea", "shareab", "aslora", "miss"]
SECTION = "continual-study"


@dataclass(frozen=True)
class Run:
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"


def run_recipe(recipe: str, overrides: list[str], run: Run, out: Path) -> Recipe:
    return load_recipe(
        recipe, [*overrides, f"adapter.method={run.method}", f"train.seed={run.seed}", f"output_dir={out / run.name}"]
    )


def run_stages_once(recipe: str, overrides: list[str], run: Run, out: Path) -> dict:
    """The run's row: its identity, trainable parameters and continual.json."""
    cfg = run_recipe(recipe, overrides, run, out)
    report = run_stages(cfg)
    last_stage = json.loads((stage_dir(cfg, len(cfg.stages) - 1) / SUMMARY_FILE).read_text())
    return {
        "method": run.method,
        "rank": cfg.adapter.rank,
        "seed": run.seed,
        "trainable_params": last_stage["trainable_parameters"],
        **report.summary,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Per method (in the rows' order): the seeds' mean matrix and initial row, and mean ± std of the summaries."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    summary = []
    for method in methods:
        group = [row for row in rows if row["method"] == method]
        matrices = [row["matrix"] for row in group]
        summary.append({
            "method": method, "rank": group[0]["rank"], "seeds": len(group), "tasks": group[0]["tasks"],
            "trainable_params": group[0]["trainable_params"],
            "initial": [statistics.mean(column) for column in zip(*(row["initial"] for row in group))],
            "matrix": [[statistics.mean(cells) for cells in zip(*rows_i)] for rows_i in zip(*matrices)],
            "average_accuracy": mean_std([row["average_accuracy"] for row in group]),
            "backward_transfer": mean_std([row["backward_transfer"] for row in group]),
            "forgetting": {task: mean_std([row["forgetting"][task] for row in group]) for task in group[0]["forgetting"]},
        })  # fmt: skip
    return summary


def percent(pair: tuple[float, float], signed: bool = False) -> str:
    mean, std = pair
    return f"{100 * mean:{'+' if signed else ''}.1f} ± {100 * std:.1f}"


def overview(summary: list[dict]) -> list[str]:
    forgettable = list(summary[0]["forgetting"])
    lines = [
        "| method | rank | trainable params | average accuracy (%) | backward transfer (points) | "
        + " | ".join(f"forgetting: {task}" for task in forgettable)
        + " |",
        "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(forgettable),
    ]
    for s in sorted(summary, key=lambda s: -s["average_accuracy"][0]):
        cells = [
            s["method"],
            str(s["rank"]),
            f"{s['trainable_params']:,}",
            percent(s["average_accuracy"]),
            percent(s["backward_transfer"], signed=True),
            *(percent(s["forgetting"][t]) for t in forgettable),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def matrix_table(entry: dict, stage_names: list[str]) -> list[str]:
    """One method's accuracy matrix (%, mean over seeds): a row before the stages and one after each."""
    lines = [
        f"**{entry['method']}** (accuracy %, mean of {entry['seeds']} seeds)",
        "",
        "| after | " + " | ".join(entry["tasks"]) + " |",
        "| --- |" + " ---: |" * len(entry["tasks"]),
    ]
    labels = ["(base)", *stage_names]
    for label, row in zip(labels, [entry["initial"], *entry["matrix"]]):
        lines.append(f"| {label} | " + " | ".join(f"{100 * value:.1f}" for value in row) + " |")
    return lines


def markdown(summary: list[dict], stage_names: list[str], command: str, setup: str) -> str:
    lines = [f"Command: `{command}`", "", setup, "", *overview(summary)]
    for entry in summary:
        lines += ["", *matrix_table(entry, stage_names)]
    return "\n".join(lines)


def describe_setup(cfg: Recipe, seeds: list[int], timing: str) -> str:
    stages = ", ".join(stage_name(cfg, k) for k in range(len(cfg.stages)))
    return (
        f"Recipe as shipped, model `{cfg.model.name_or_path}`, rank {cfg.adapter.rank}, alpha {cfg.adapter.alpha}, "
        f"stages {stages}; seeds {', '.join(map(str, seeds))}. {timing} on {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)."
    )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart-continual.yaml", help="a recipe with stages:")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run (repeatable), e.g. adapter.rank=16",
    )
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from: {', '.join(METHOD_NAMES)}")
    parser.add_argument("--seeds", type=whole_numbers, default="0,1,2", help="comma-separated")
    parser.add_argument("--out", type=Path, default=Path("runs/continual-study"), help="one folder per run")
    parser.add_argument("--json", type=Path, help="write one row per run")
    parser.add_argument("--markdown", type=Path, default=Path("docs/continual.md"), help="update its study section")
    parser.add_argument(
        "--section",
        default=SECTION,
        help="the markers the tables go between (<!-- NAME:begin -->), for a second study in one file",
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHOD_NAMES]
    if unknown or not args.methods:
        parser.error(
            f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHOD_NAMES)}"
        )
    try:
        cfg = load_recipe(args.recipe, args.override)
    except UserError as err:
        parser.error(f"--recipe: {err}")
    if len(cfg.stages) < 2:
        parser.error(f"--recipe {args.recipe} has {len(cfg.stages)} stage(s): a continual study needs two or more")
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    runs = [Run(method, seed) for method in args.methods for seed in args.seeds]
    rows, timing = run_all(
        runs,
        lambda run: finished_or_run(
            args.out / run.name, lambda: run_stages_once(args.recipe, args.override, run, args.out)
        ),
        lambda row: (
            f"average accuracy {row['average_accuracy']:.3f}, backward transfer {row['backward_transfer']:+.3f}"
        ),
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    command = "python scripts/continual_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    stage_names = [stage_name(cfg, k) for k in range(len(cfg.stages))]
    body = markdown(summarise(rows), stage_names, command, describe_setup(cfg, args.seeds, timing))
    replace_section(args.markdown, args.section, body, "Continual fine-tuning")
    print(f"tables written to {args.markdown}")


if __name__ == "__main__":
    main()
