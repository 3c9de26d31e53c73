"""Run lm-evaluation-harness and `sharelora eval` on the same GSM8K and MMLU samples, offline.

Both see the same prompts (the harness's own gsm8k / mmlu YAML on the local data files, GSM8K shots taken
with its first_n sampler) and the same model directory. Prints how often the two agree on the MMLU answer
chosen; for each GSM8K metric (strict-match, flexible-extract) on the answer extracted, on the per-sample
verdict and on the score; on the raw generation; and the wall time of each.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/compare_lm_eval.py --gsm8k-limit 8 --mmlu-limit 4
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from sharelora_cli.config.recipe import GSM8KTaskConfig, MMLUTaskConfig, ModelConfig, QuantizationConfig
from sharelora_cli.core.paths import data_dir
from sharelora_cli.evaluation import gsm8k, harness_tasks, mmlu
from sharelora_cli.evaluation.engine import Engine, context_window
from sharelora_cli.models.loading import load_model, load_tokenizer
from sharelora_cli.models.tiny_model import build_tiny_model

DEFAULT_SUBJECTS = ["abstract_algebra", "anatomy", "high_school_us_history", "sociology", "virology"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: build the tiny offline Llama in a temp dir)")
    parser.add_argument("--gsm8k-limit", type=int, default=8)
    parser.add_argument("--gsm8k-shots", type=int, default=8)
    parser.add_argument("--mmlu-limit", type=int, default=4, help="questions per subject")
    parser.add_argument("--subjects", default=",".join(DEFAULT_SUBJECTS), help="comma-separated MMLU subjects")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args()


class Stopwatch:
    """Seconds per named phase, and the total since it was created."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.last, 1)
        self.last = now

    def summary(self) -> dict[str, float]:
        return {**self.seconds, "total": round(self.last - self.started, 1)}


def run_ours(model_dir: str, args: argparse.Namespace, subjects: list[str]) -> tuple[dict, dict]:
    watch = Stopwatch()
    tokenizer = load_tokenizer(model_dir)
    model = load_model(ModelConfig(name_or_path=model_dir), QuantizationConfig(), torch.device("cpu"))
    engine = Engine(model, tokenizer, args.batch_size, context_window(model, None))
    watch.lap("setup")
    gsm = gsm8k.evaluate(
        engine, GSM8KTaskConfig(path=str(data_dir() / "gsm8k"), num_fewshot=args.gsm8k_shots), args.gsm8k_limit
    )
    watch.lap("gsm8k")
    mm = mmlu.evaluate(engine, MMLUTaskConfig(path=str(data_dir() / "mmlu"), subjects=subjects), args.mmlu_limit)
    watch.lap("mmlu")
    return {"gsm8k": gsm, "mmlu": mm}, watch.summary()


def run_harness(model_dir: str, args: argparse.Namespace, subjects: list[str]) -> tuple[dict, dict]:
    """Setup is loading the model and building the task objects (which loads and maps the datasets)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    watch = Stopwatch()
    lm = HFLM(pretrained=model_dir, batch_size=args.batch_size, device="cpu")
    gsm_task = harness_tasks.gsm8k_task(data_dir() / "gsm8k", args.gsm8k_shots)
    mmlu_tasks = [harness_tasks.mmlu_task(data_dir() / "mmlu", subject, 5) for subject in subjects]
    watch.lap("setup")
    samples = {}
    for name, tasks, limit in (("gsm8k", [gsm_task], args.gsm8k_limit), ("mmlu", mmlu_tasks, args.mmlu_limit)):
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=True, bootstrap_iters=0)
        samples.update(out["samples"])
        watch.lap(name)
    return samples, watch.summary()


def gsm8k_agreement(ours: list[dict], theirs: list[dict]) -> dict:
    """Per harness metric: the answer each side extracted, each side's verdict, and the two scores; and the raw outputs."""
    by_filter: dict[str, dict[int, dict]] = {}
    for sample in theirs:
        by_filter.setdefault(sample["filter"], {})[sample["doc_id"]] = sample
    figures: dict = {"samples": len(ours)}
    for metric in gsm8k.FILTERS:
        harness = [by_filter[metric][doc_id] for doc_id in range(len(ours))]
        figures[metric] = {
            "answer_agreement": mean([r[metric]["extracted"] == h["filtered_resps"][0] for r, h in zip(ours, harness)]),
            "verdict_agreement": mean(
                [r[metric]["correct"] == (h["exact_match"] == 1.0) for r, h in zip(ours, harness)]
            ),
            "sharelora": mean([r[metric]["correct"] for r in ours]),
            "lm_eval": mean([h["exact_match"] for h in harness]),
        }
    outputs = by_filter["strict-match"]
    figures["output_agreement"] = mean([r["output"] == outputs[doc_id]["resps"][0][0] for doc_id, r in enumerate(ours)])
    return figures


def mean(values: list) -> float:
    return float(sum(values) / len(values))


def mmlu_agreement(ours: list[dict], theirs: dict[str, list[dict]]) -> dict:
    agree, total, max_logprob_diff = 0, 0, 0.0
    for subject, samples in theirs.items():
        if not subject.startswith("mmlu_"):
            continue
        mine = [r for r in ours if r["subject"] == subject.removeprefix("mmlu_")]
        for sample in samples:
            logprobs = [float(resp[0]) for resp in sample["filtered_resps"]]
            chosen = mmlu.LETTERS[max(range(4), key=logprobs.__getitem__)]
            record = mine[sample["doc_id"]]
            agree += chosen == record["extracted"]
            total += 1
            max_logprob_diff = max(max_logprob_diff, *(abs(a - b) for a, b in zip(logprobs, record["logprobs"])))
    return {"questions": total, "answer_agreement": agree / total, "max_logprob_difference": max_logprob_diff}


def main() -> None:
    args = parse_args()
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or str(build_tiny_model(Path(scratch) / "tiny-llama"))
        ours, our_seconds = run_ours(model_dir, args, subjects)
        theirs, harness_seconds = run_harness(model_dir, args, subjects)
    figures = {
        "model": args.model or "tiny offline Llama (sharelora_cli.models.tiny_model)",
        "torch_threads": torch.get_num_threads(),
        "gsm8k": {**gsm8k_agreement(ours["gsm8k"].records, theirs["gsm8k"]), "num_fewshot": args.gsm8k_shots},
        "mmlu": {**mmlu_agreement(ours["mmlu"].records, theirs), "subjects": subjects, "num_fewshot": 5},
        "seconds": {"sharelora": our_seconds, "lm_eval": harness_seconds},
        "lm_eval_over_sharelora": {
            phase: round(harness_seconds[phase] / seconds, 2) for phase, seconds in our_seconds.items() if seconds
        },
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
