"""Run one untrusted Python program in a throwaway child process and report whether it finished cleanly.

Layers (docs/sandbox.md says what each stops and what none of them stops): a separate process in its own
session, killed as a group at the deadline; a scrubbed environment, /dev/null for stdin and a fresh working
directory removed afterwards; inside the child (sandbox_child.py) kernel resource limits, a private network
namespace and the nobody user when started as root, and refusals of process, file, signal and socket calls.
Linux only (pidfd, rlimits, namespaces).
"""

import marshal
import math
import os
import select
import signal
import site
import subprocess
import sys
import tempfile
from typing import NamedTuple

from sharelora_cli.evaluation import sandbox_child

_CHILD_SCRIPT = os.path.abspath(sandbox_child.__file__)


class Limits(NamedTuple):
    """What one program may use; the CPU-time limit is derived from the wall-clock timeout."""

    timeout: float = 3.0
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20


class Outcome(NamedTuple):
    """Whether the program ran to the end, and a one-line result: "passed", "timed out" or "failed: why"."""

    passed: bool
    result: str


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Execute source in a sandboxed child; it passes only if it runs to completion without raising."""
    nonce = os.urandom(16).hex()
    with (
        tempfile.TemporaryDirectory(prefix="sharelora-sandbox-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as settings,
        tempfile.TemporaryFile() as output,
        tempfile.TemporaryFile() as verdict,
    ):
        if os.geteuid() == 0:
            os.chown(workdir, sandbox_child.NOBODY, sandbox_child.NOBODY)  # the child becomes nobody
        settings.write(marshal.dumps(_child_settings(source, nonce, verdict.fileno(), limits)))
        settings.seek(0)
        # Settings arrive on stdin from an unlinked file, so the nonce is nowhere the program can open.
        child = subprocess.Popen(
            # -S: site's .pth hooks cost more than most tests take; the child adds site-packages itself.
            [sys.executable, "-I", "-S", "-B", _CHILD_SCRIPT],
            stdin=settings,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(verdict.fileno(),),
            cwd=workdir,
            env=_child_environment(workdir),
            start_new_session=True,
        )
        timed_out = not _wait_for_exit(child.pid, limits.timeout)
        _kill_session(child.pid)
        returncode = child.wait()
        return _judge(returncode, timed_out, _read_head(verdict), _last_line(output), nonce)


def _child_settings(source: str, nonce: str, verdict_fd: int, limits: Limits) -> dict:
    return {
        "source": source,
        "nonce": nonce,
        "verdict_fd": verdict_fd,
        "parent_pid": os.getpid(),
        "site_packages": site.getsitepackages(),
        "cpu_seconds": math.ceil(limits.timeout) + 1,  # a backstop: the wall-clock kill comes first
        "memory_bytes": limits.memory_mb << 20,
        "max_output_bytes": limits.max_output_bytes,
    }


def _child_environment(workdir: str) -> dict[str, str]:
    """Nothing from the parent's environment: no tokens, keys or proxy settings reach the program."""
    single_thread = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", **single_thread}


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until the child exits without reaping it, so its process group id cannot be reused yet."""
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(math.ceil(timeout * 1000)))
    finally:
        os.close(pidfd)


def _kill_session(pid: int) -> None:
    """SIGKILL the child and anything it managed to start in its process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_head(handle) -> str:
    handle.seek(0)
    return handle.read(sandbox_child.VERDICT_BYTES).decode("utf-8", errors="replace")


def _last_line(handle) -> str:
    """The last non-empty line the child printed, to explain an exit without a verdict."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - 300))
    lines = handle.read().decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1].strip()[:200] if lines else ""


def _judge(returncode: int, timed_out: bool, verdict: str, last_line: str, nonce: str) -> Outcome:
    """Turn how the child ended into an Outcome; only the secret nonce plus exit code 0 counts as passing."""
    if timed_out or returncode == -signal.SIGXCPU:
        return Outcome(False, "timed out")
    if returncode == 0 and verdict == nonce:
        return Outcome(True, "passed")
    if verdict.startswith("failed: "):
        return Outcome(False, verdict)
    if returncode < 0:
        return Outcome(False, f"failed: killed by {signal.Signals(-returncode).name}")
    detail = f" ({last_line})" if last_line else ""
    return Outcome(False, f"failed: exited with code {returncode} before finishing{detail}")
