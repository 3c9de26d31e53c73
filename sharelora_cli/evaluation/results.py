"""What a task returns, the terminal table, and the results file.

The file maps each task name to its metrics ({"gsm8k": {"exact_match": ...}, ...}); the per-sample records
sit under "records" and the run's model, adapter and settings under "config" (how a task ran, e.g. HumanEval's
sandbox, under "config"/"settings"/TASK).
"""

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

Metric = float | int | None  # None: JSON null, e.g. the perplexity of a document too short to score
# A str may hold halves of a UTF-16 pair on their own (JSON's "\ud800" decodes to one), which UTF-8 cannot encode.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# What json leaves raw but a terminal may act on (DEL, C1 controls such as CSI) or that reorders or breaks what it
# shows (bidi overrides, line and paragraph separators): written as \u escapes, the same string to a JSON reader.
_UNSHOWABLE = re.compile("[\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass
class TaskResult:
    metrics: Mapping[str, Metric]
    records: list[dict] = field(default_factory=list)
    settings: Mapping[str, object] = field(default_factory=dict)  # how it ran (HumanEval: its sandbox), for "config"


def format_table(results: Mapping[str, TaskResult]) -> str:
    """task / metric / value lines; per-subject MMLU accuracies are left to the results file."""
    lines = [f"{'task':<12}{'metric':<28}{'value':>12}"]
    for task, result in results.items():
        for name, value in result.metrics.items():
            if name.startswith("subject/"):
                continue
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{task:<12}{name:<28}{shown:>12}")
    return "\n".join(lines)


def results_document(results: Mapping[str, TaskResult], config: dict) -> dict:
    return {
        **{task: result.metrics for task, result in results.items()},
        "records": {task: result.records for task, result in results.items()},
        "config": {
            **config,
            "settings": {task: result.settings for task, result in results.items() if result.settings},
        },
    }


def write_json(document: dict, path: Path) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json_text(document, indent=1) + "\n", encoding="utf-8")
    os.replace(staging, path)


def json_text(document, indent: int | None = None) -> str:
    """JSON that encodes as UTF-8 and shows safely whatever its strings hold: C0 controls are escaped by json,
    the _UNSHOWABLE ones here, and a lone surrogate (from a sample's text or a samples file) becomes U+FFFD.
    Outside strings JSON is ASCII, so each substitution lands inside a string."""
    text = _LONE_SURROGATE.sub("\ufffd", json.dumps(document, indent=indent, ensure_ascii=False))
    return _UNSHOWABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
