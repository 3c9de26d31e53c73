"""Multi-process CPU training when started by `accelerate launch --cpu --num_processes N`.

Accelerate's --cpu launcher starts a single process and expects mpirun to start the others
(it only sets MASTER_ADDR/MASTER_PORT). Without MPI, sharelora notices that situation and
starts the N gloo workers itself with torch.distributed.run, so the documented command works.
"""

import os
import subprocess
import sys
from pathlib import Path


def requested_cpu_processes() -> int:
    """N from the parent `accelerate launch --cpu --num_processes N`, or 1 when not in that situation."""
    env = os.environ
    single_cpu_launch = env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
    already_distributed = any(k in env for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    if not single_cpu_launch or already_distributed:
        return 1
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 1
    return _num_processes(parent)


def _num_processes(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
            if arg.startswith(flag + "=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return 1


def worker_command(processes: int, argv: list[str], program: tuple[str, ...] = ("-m", "sharelora_cli")) -> list[str]:
    """`sharelora ARGV` (or another program: a script's path) as `processes` workers on this machine (torchrun,
    standalone rendezvous)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *program,
        *argv,
    ]


def relaunch_as_workers(processes: int, argv: list[str]) -> int:
    """Run this same command as `processes` gloo workers on this machine; return their exit code."""
    command = worker_command(processes, argv)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    return subprocess.call(command, env=env)
