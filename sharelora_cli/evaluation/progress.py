"""What a long task shows while it runs: tqdm's bar on a terminal, one plain line per finished part elsewhere.

As in training (training/progress.py), a bar redrawn with carriage returns makes a log file unreadable, so when
stderr is not a terminal each part (an MMLU subject) becomes one line there instead:

    mmlu 3/57  anatomy  acc 0.4000 (54/135)  12.3 s
"""

import sys
import time
from typing import IO

from tqdm.auto import tqdm


class TaskProgress:
    def __init__(self, task: str, total: int, unit: str, stream: IO[str] | None = None):
        self.task, self.total, self.done = task, total, 0
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.bar = None if not self.stream.isatty() else tqdm(total=total, desc=task, unit=unit, file=self.stream)

    def update(self, part: str, detail: str) -> None:
        """One part finished: its name and how it went."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{part} {detail}")
            return
        seconds = time.perf_counter() - self.started
        line = f"{self.task} {self.done}/{self.total}  {part}  {detail}  {seconds:.1f} s"
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> "TaskProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
