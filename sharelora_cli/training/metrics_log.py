"""A run's metrics: one JSON object per logged step in metrics.jsonl, and the same scalars to Accelerate's trackers.

train.report_to names the trackers (TensorBoard by default, under OUTPUT_DIR/tensorboard; wandb, mlflow and
the others Accelerate supports when their package is installed). Only the main process writes.
"""

import json
import math
from collections.abc import Sequence
from pathlib import Path

import accelerate.utils.imports as available
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker

from sharelora_cli.core.errors import UserError
from sharelora_cli.training.checkpoint import write_failure

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROJECT = "sharelora"
# Where a tracker's pip name differs from its name in train.report_to.
PIP_NAMES = {"comet_ml": "comet-ml"}


def trackers(names: Sequence[str], output_dir: Path) -> list:
    """What Accelerator(log_with=...) takes for train.report_to; a tracker without its package is refused."""
    for name in names:
        if not getattr(available, f"is_{name}_available")():
            raise UserError(
                f"train.report_to: {name} is not installed; `pip install {PIP_NAMES.get(name, name)}` "
                f"or remove it from train.report_to"
            )
    # TensorBoard by instance, to keep its files in OUTPUT_DIR/tensorboard whatever the project is called.
    return [TensorBoardTracker(TENSORBOARD_DIR, output_dir) if name == "tensorboard" else name for name in names]


def strict_json(record: dict) -> dict:
    """NaN and inf as null: json.dumps would write bare NaN/Infinity, which strict JSON parsers reject."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def tracker_tag(key: str) -> str:
    """Evaluation metrics ("gsm8k/strict-match") under eval/, the training scalars under train/."""
    return f"eval/{key}" if "/" in key else f"train/{key}"


def flat_config(values: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A recipe as the flat scalars trackers store as hyperparameters ("adapter.rank": 8, lists as text)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return flat


class MetricsLog:
    """metrics.jsonl and the trackers the accelerator was built with (trackers()), main process only.

    run_fields (how the run is distributed: strategy, processes) go into every metrics.jsonl row, so a row
    read alone says how it was made; they are constants of the run, not series, so trackers do not get them.
    """

    def __init__(self, output_dir: Path, accelerator: Accelerator, config: dict, run_fields: dict | None = None):
        self.accelerator, self.output_dir = accelerator, output_dir
        self.run_fields = run_fields or {}
        self.enabled = accelerator.is_main_process
        if self.enabled:
            # Unbuffered: a failed write raises here, not again when the file is closed at exit.
            self.file = open(output_dir / METRICS_FILE, "ab", buffering=0)
        accelerator.init_trackers(PROJECT, config=flat_config(config))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write((json.dumps(strict_json({**record, **self.run_fields})) + "\n").encode())
        except OSError as err:  # written every step, so a full disk usually shows here first
            raise write_failure(Path(self.file.name), err.strerror or str(err), self.output_dir) from None
        scalars = {tracker_tag(k): v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
        # Not accelerator.end_training(): that also destroys the process group, which later stages and the
        # processes' final barrier still need.
        for tracker in self.accelerator.trackers:
            tracker.finish()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after `step` (the checkpoint resumed from, or 0), so the log has no repeats."""
    if path.is_file():
        kept = [
            line
            for line in path.read_text().splitlines()
            if (logged := logged_step(line)) is not None and logged <= step
        ]
        path.write_text("".join(line + "\n" for line in kept))


def logged_step(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one cut short by a crash mid-write."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
