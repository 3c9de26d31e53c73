"""What a run shows while it trains: tqdm's bar on a terminal, one plain line per logged step anywhere else.

A bar redrawn with carriage returns turns a log file into a few very long lines that no one can grep; when
stderr (where the bar goes) is not a terminal, each logged step becomes one line there instead:

    step 10/30  loss 1.2346  lr 2.00e-04  tok/s 1234  epoch 0.53  val_loss 1.1982
"""

import sys
from typing import IO

from tqdm.auto import tqdm


def step_line(record: dict, total: int) -> str:
    """One logged step as a line: losses to 4 decimals, lr to 3 significant digits, tokens/s whole."""
    parts = [f"step {record['step']}/{total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    parts.append(f"tok/s {record['tokens_per_s']:.0f}")
    parts.append(f"epoch {record['epoch']:.2f}")
    for key, value in record.items():
        if (key == "val_loss" or "/" in key) and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)


class Progress:
    """The bar on a terminal; elsewhere one step_line per logged step. Only the enabled (main) process shows it."""

    def __init__(self, total: int, initial: int, enabled: bool, stream: IO[str] | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.lines = enabled and not self.stream.isatty()
        self.bar = (
            tqdm(total=total, initial=initial, desc="train", file=self.stream) if enabled and not self.lines else None
        )

    def update(self, record: dict, logged: bool) -> None:
        """Show a finished step; `logged`: whether it went to metrics.jsonl, which is when a plain line is written."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
        elif self.lines and logged:
            print(step_line(record, self.total), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        # Closing the bar here puts an error (disk full, non-finite loss, signal) on a line of its own.
        if self.bar is not None:
            self.bar.close()
