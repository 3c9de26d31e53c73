"""The continual-learning summaries of an accuracy matrix: matrix[i][j] is task j's accuracy after stage i.

- average_accuracy: the mean of the last row (over every task, those of stages not yet trained included).
- average_accuracy_seen[i]: A_i, the mean of row i over the tasks of stages 0..i, the ones trained so far
  (Chaudhry et al., 2018): one entry per stage done, the last one the current A_k; after the final stage
  it equals average_accuracy.
- forgetting[task]: the best accuracy the task had from its own stage until the stage before the last,
  minus its final accuracy (Chaudhry et al., 2018); tasks of the last stage are not yet forgettable.
- backward_transfer: the mean, over those same tasks, of final accuracy minus the accuracy right after
  their own stage (Lopez-Paz & Ranzato, 2017); negative when training later stages hurt them.
- forward_transfer: the mean, over tasks of every stage but the first, of the accuracy just before their
  own stage minus the accuracy before any stage (`initial`): what earlier stages taught them for free.
"""

from dataclasses import dataclass
from statistics import fmean


@dataclass(frozen=True)
class ContinualTask:
    """A column of the matrix: an evaluation of stage `stage` (0-based) by `task`."""

    name: str
    stage: int
    task: str


def summarize(columns: list[ContinualTask], rows: list[list[float]], initial: list[float]) -> dict:
    """continual.json's contents for the stages done so far (one row each)."""
    final, last = rows[-1], len(rows) - 1
    learned = [j for j, column in enumerate(columns) if column.stage < last]
    forgetting = {columns[j].name: max(rows[i][j] for i in range(columns[j].stage, last)) - final[j] for j in learned}
    transfer_back = [final[j] - rows[columns[j].stage][j] for j in learned]
    transfer_forward = [
        rows[column.stage - 1][j] - initial[j] for j, column in enumerate(columns) if 1 <= column.stage <= last + 1
    ]
    return {
        "tasks": [column.name for column in columns],
        "stages_done": len(rows),
        "initial": initial,
        "matrix": rows,
        "average_accuracy": fmean(final),
        "average_accuracy_seen": [seen_average(columns, row, i) for i, row in enumerate(rows)],
        "forgetting": forgetting,
        "backward_transfer": fmean(transfer_back) if transfer_back else None,
        "forward_transfer": fmean(transfer_forward) if transfer_forward else None,
    }


def seen_average(columns: list[ContinualTask], row: list[float], stage: int) -> float | None:
    """The mean of a row (the accuracies after `stage`) over the tasks of the stages trained by then (None: no such task)."""
    seen = [value for value, column in zip(row, columns) if column.stage <= stage]
    return fmean(seen) if seen else None


def format_table(summary: dict, stage_names: list[str]) -> str:
    """The matrix as rows "before" and "after <stage>", then the summaries, for the terminal."""
    width = max(12, *(len(name) + 2 for name in summary["tasks"]))
    header = f"{'accuracy':<16}" + "".join(f"{name:>{width}}" for name in summary["tasks"])
    labels = ["before stages", *(f"after {name}" for name in stage_names[: summary["stages_done"]])]
    lines = [header] + [
        f"{label:<16}" + "".join(f"{value:>{width}.4f}" for value in row)
        for label, row in zip(labels, [summary["initial"], *summary["matrix"]])
    ]
    lines.append(
        f"average accuracy {summary['average_accuracy']:.4f} (seen tasks {_seen(summary)}); "
        f"backward transfer "
        f"{_number(summary['backward_transfer'])}; forward transfer {_number(summary['forward_transfer'])}"
    )
    if summary["forgetting"]:
        lines.append("forgetting: " + ", ".join(f"{name} {value:.4f}" for name, value in summary["forgetting"].items()))
    return "\n".join(lines)


def _seen(summary: dict) -> str:
    value = summary["average_accuracy_seen"][-1]
    return "n/a" if value is None else f"{value:.4f}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"
