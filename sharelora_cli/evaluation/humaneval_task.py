"""HumanEval as an eval task: complete each prompt (or read completions from a file), then score pass@k.

Scoring and the sandbox live in humaneval.py / sandbox.py. One sample per problem is greedy (pass@1);
more are sampled with temperature and top-p, giving pass@k for every configured k up to num_samples.
"""

from pathlib import Path

from sharelora_cli.config.recipe import HumanEvalTaskConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.engine import Engine, Sampling
from sharelora_cli.evaluation.humaneval import (
    STOP_SEQUENCES,
    load_problems,
    read_samples,
    score_samples,
    truncate_completion,
)
from sharelora_cli.evaluation.results import TaskResult
from sharelora_cli.evaluation.sandbox.session import Isolation, choose_isolation

REFUSAL = "humaneval executes model-written code: pass --allow-code-execution to run it (ideally in a container)"


def require_permission(allow_code_execution: bool, allow_weak_sandbox: bool = False) -> Isolation:
    """Refuse before any model is loaded or any completion generated: without consent, or without namespaces
    for the sandbox unless the weaker guard was accepted. Returns the sandbox the samples will run in."""
    if not allow_code_execution:
        raise UserError(REFUSAL)
    return choose_isolation(allow_weak_sandbox)


def progress_file(results_file: Path) -> Path:
    """Where scored samples are appended while HumanEval runs: beside the results file."""
    return results_file.with_name(f"{results_file.name}.humaneval-progress.jsonl")


def generate_samples(engine: Engine, problems: dict[str, dict], cfg: HumanEvalTaskConfig) -> list[dict]:
    """num_samples completions per problem, each {"task_id", "completion", "output"} (output: before truncation)."""
    sampling = None if cfg.num_samples == 1 else Sampling(cfg.temperature, cfg.top_p)
    task_ids = [task_id for task_id in problems for _ in range(cfg.num_samples)]
    outputs = engine.generate([problems[t]["prompt"] for t in task_ids], STOP_SEQUENCES, cfg.max_new_tokens, sampling)
    return [{"task_id": t, "completion": truncate_completion(out), "output": out} for t, out in zip(task_ids, outputs)]


def evaluate(
    engine: Engine | None,
    cfg: HumanEvalTaskConfig,
    limit: int | None,
    samples_file: Path | None,
    allow_code_execution: bool,
    allow_weak_sandbox: bool = False,
    results_file: Path | None = None,
) -> TaskResult:
    isolation = require_permission(allow_code_execution, allow_weak_sandbox)
    print(f"humaneval sandbox: {isolation.value}", flush=True)  # a plain line, also where no progress bar shows
    problems = load_problems(Path(cfg.path))
    kept = dict(list(problems.items())[:limit])
    if samples_file is not None:
        samples = [s for s in read_samples(samples_file, problems) if s["task_id"] in kept]
    elif engine is None:
        raise UserError("humaneval needs --model (to generate completions) or --samples FILE.jsonl")
    else:
        samples = generate_samples(engine, kept, cfg)
    scored = score_samples(
        kept, samples, cfg.ks, cfg.timeout, cfg.workers,
        allow_code_execution=allow_code_execution, isolation=isolation,
        progress_file=progress_file(results_file) if results_file else None,
    )  # fmt: skip
    records = [
        {"prompt": kept[record["task_id"]]["prompt"], **sample, **record, "correct": record["passed"]}
        for sample, record in zip(samples, scored.pop("records"))
    ]
    return TaskResult(scored, records, {"sandbox": isolation.value})
