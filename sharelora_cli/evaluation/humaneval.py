"""HumanEval (Chen et al., 2021): run model completions against each problem's unit tests, report pass@k.

A sample is {"task_id", "completion"}: the code a model wrote after the problem's prompt. prompt + completion
runs in the sandbox, which executes model-generated code and therefore needs the caller's explicit consent
(--allow-code-execution); the problem's tests run against it from outside (humaneval_check.py).
"""

import contextlib
import gzip
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from sharelora_cli.core.errors import UserError, first_line
from sharelora_cli.core.paths import data_dir
from sharelora_cli.evaluation.humaneval_check import check_sample
from sharelora_cli.evaluation.results import json_text
from sharelora_cli.evaluation.sandbox.session import Isolation, Limits, choose_isolation

# A completion ends where the model starts a new top-level statement after the function body.
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
_PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")


def load_problems(path: Path | None = None) -> dict[str, dict]:
    """task_id -> problem from HumanEval.jsonl(.gz); defaults to the shared benchmark data."""
    path = Path(path) if path else data_dir() / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError(f"HumanEval problems not found at {path}: set SHARELORA_DATA to the benchmark data directory")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = first_line(err)
        raise UserError(
            f"{path} is not a readable HumanEval JSONL file ({reason}): restore it from the HumanEval release"
        ) from err
    if not rows or not all(isinstance(row, dict) and all(field in row for field in _PROBLEM_FIELDS) for row in rows):
        raise UserError(f"{path} is not HumanEval data: every line needs the fields {', '.join(_PROBLEM_FIELDS)}")
    return {row["task_id"]: row for row in rows}


def read_samples(path: Path, problems: Mapping[str, dict] | None = None) -> list[dict]:
    """Samples from a JSONL file, one {"task_id", "completion"} per line, any number per task."""
    path = Path(path)
    known = problems if problems is not None else load_problems()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read samples file {path} ({first_line(err)})") from err
    lines = enumerate(text.splitlines(), start=1)
    samples = [_parse_sample(line, f"{path}:{number}", known) for number, line in lines if line.strip()]
    if not samples:
        raise UserError(
            f"samples file {path} has no samples: write one JSON object per line with task_id and completion"
        )
    return samples


def _parse_sample(line: str, where: str, problems: Mapping[str, dict]) -> dict:
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{where}: not valid JSON ({err.msg}); write one object with task_id and completion per line"
        ) from err
    if not (
        isinstance(sample, dict)
        and isinstance(sample.get("task_id"), str)
        and isinstance(sample.get("completion"), str)
    ):
        raise UserError(f"{where}: each line needs a string task_id and a string completion")
    if sample["task_id"] not in problems:
        raise UserError(f"{where}: unknown task_id {sample['task_id']!r}; HumanEval ids look like 'HumanEval/0'")
    return sample


def truncate_completion(text: str) -> str:
    """Text up to the first stop sequence, i.e. the function body the model meant to write."""
    cuts = [index for index in (text.find(stop) for stop in STOP_SEQUENCES) if index != -1]
    return text[: min(cuts)] if cuts else text


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) passes.

    1 - C(n-c, k) / C(n, k), computed as a product of ratios so large n neither overflows nor loses precision.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / drawn for drawn in range(n - c + 1, n + 1))


def score_samples(
    problems: Mapping[str, dict],
    samples: Sequence[dict],
    ks: Iterable[int] = (1, 10, 100),
    timeout: float = 3.0,
    workers: int = 2,
    *,
    allow_code_execution: bool = False,
    allow_weak_sandbox: bool = False,
    isolation: Isolation | None = None,
    progress_file: Path | None = None,
) -> dict:
    """Run every sample in the sandbox; pass@k for each k no larger than the fewest samples of any task.

    isolation: None picks the strongest this machine allows (see sandbox.choose_isolation); progress_file: each
    record is appended to it as soon as its sample is scored, so an interrupted run keeps what it finished.
    """
    if not allow_code_execution:
        raise UserError(
            "HumanEval runs each completion: refusing to execute model-generated code without --allow-code-execution"
            " (see docs/sandbox.md for what the sandbox does and does not stop)"
        )
    ks = tuple(ks)
    _check_request(problems, samples, ks, timeout, workers)
    isolation = isolation or choose_isolation(allow_weak_sandbox)
    limits = Limits(timeout=timeout)
    records: list[dict | None] = [None] * len(samples)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with _progress_log(progress_file) as log:
            runs = {
                pool.submit(check_sample, problems[sample["task_id"]], sample["completion"], limits, isolation): index
                for index, sample in enumerate(samples)
            }
            finished = tqdm(
                as_completed(runs), total=len(runs), desc=f"humaneval ({isolation.value} sandbox)", disable=None
            )
            for run in finished:
                index = runs[run]
                passed, result = run.result()
                sample = samples[index]
                records[index] = {
                    "task_id": sample["task_id"],
                    "completion": sample["completion"],
                    "passed": passed,
                    "result": result,
                }
                log(records[index])
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, drop the queued samples instead of running them all
    scored = [record for record in records if record is not None]
    assert len(scored) == len(records)  # every future completed, or its exception left above
    num_tasks = len({record["task_id"] for record in scored})
    return {**_pass_rates(scored, ks), "num_tasks": num_tasks, "num_samples": len(scored), "records": scored}


@contextlib.contextmanager
def _progress_log(path: Path | None):
    """A function that appends one JSON line per record to path and flushes it (or does nothing without path)."""
    if path is None:
        yield lambda record: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:

        def log(record: dict) -> None:
            handle.write(json_text(record) + "\n")
            handle.flush()

        yield log


def _check_request(
    problems: Mapping[str, dict], samples: Sequence[dict], ks: tuple[int, ...], timeout: float, workers: int
) -> None:
    if not samples:
        raise UserError("no HumanEval samples to score: give at least one {task_id, completion}")
    unknown = sorted({sample["task_id"] for sample in samples} - set(problems))
    if unknown:
        raise UserError(f"samples name task_ids that are not HumanEval problems: {', '.join(unknown[:3])}")
    if not all(isinstance(k, int) and k >= 1 for k in ks):
        raise UserError(f"pass@k values must be positive integers, got {list(ks)}")
    if timeout <= 0 or workers < 1:
        raise UserError(f"HumanEval needs timeout > 0 and workers >= 1, got timeout={timeout}, workers={workers}")


def _pass_rates(records: Sequence[dict], ks: tuple[int, ...]) -> dict[str, float]:
    """Mean unbiased pass@k over tasks; a k above some task's sample count would be undefined, so it is left out."""
    totals = Counter(record["task_id"] for record in records)
    correct = Counter(record["task_id"] for record in records if record["passed"])
    fewest = min(totals.values())
    return {
        f"pass@{k}": sum(pass_at_k(n, correct[task], k) for task, n in totals.items()) / len(totals)
        for k in sorted(set(ks))
        if k <= fewest
    }
