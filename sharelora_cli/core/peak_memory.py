"""Peak memory of a stretch of work in this process, above what was held when it began.

On CUDA the allocator's own counter (exact per tensor). On CPU the kernel's resident-set high-water mark,
reset to the current RSS through /proc/self/clear_refs (Linux) after glibc's malloc_trim has returned
freed heap to the OS, so memory an earlier run freed is not reused unseen.
"""

import ctypes
import gc
from pathlib import Path

import torch


class PeakMeter:
    """Peak memory above a baseline: RSS high-water mark on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
            self.baseline = proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return proc_status_bytes("VmHWM") - self.baseline


def proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")
