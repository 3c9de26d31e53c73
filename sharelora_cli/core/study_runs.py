"""The runs of a study script (scripts/method_study.py, scripts/continual_study.py): one folder each, whose
row.json marks the run finished, so a study run again reuses what it already has and an interrupted one
continues where it stopped."""

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

ROW_FILE = "row.json"


class NamedRun(Protocol):
    @property
    def name(self) -> str: ...


def whole_numbers(text: str) -> list[int]:
    """A study's --seeds or --ranks: "2,8,32" -> [2, 8, 32] (sorted, without repeats); 0 allowed, negatives and words not."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 0, got {text!r}")
    return values


def finished_or_run(folder: Path, run: Callable[[], dict]) -> tuple[dict, bool]:
    """The run's row, and whether it was reused (row.json exists) rather than run now; an unfinished run is redone."""
    done = folder / ROW_FILE
    if done.is_file():
        return json.loads(done.read_text()), True
    if folder.exists():
        print(f"{folder.name}: removing an unfinished run", flush=True)
        shutil.rmtree(folder)
    row = run()
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row) + "\n")
    return row, False


def run_all(runs: Sequence[NamedRun], run_one: Callable, describe: Callable) -> tuple[list, str]:
    """Every run's row in order, with a progress line each, and a sentence saying how many were trained and how long."""
    started, rows, trained = time.perf_counter(), [], 0
    for i, run in enumerate(runs, 1):
        row, reused = run_one(run)
        rows.append(row)
        trained += not reused
        print(f"[{i}/{len(runs)}] {run.name}: {describe(row)}" + (" (reused)" if reused else ""), flush=True)
    timing = f"{trained} of {len(runs)} runs trained in {(time.perf_counter() - started) / 60:.0f} min"
    return rows, timing + (" (the others reused from an earlier call)" if trained < len(runs) else "")
