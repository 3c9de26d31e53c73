"""Run untrusted Python in a throwaway sandbox and exchange nothing with it but plain data.

A Sandbox starts one child (child.py) that runs the program's top-level code and then answers calls to
the functions it defined. The caller (HumanEval's checker, in this process) only ever sees plain values coming
back (wire.py), so the verdict is decided outside the program's reach.

The boundary is the kernel's: each child gets its own PID, mount, network, IPC and UTS namespaces, a file system
that holds only an allowlist (the interpreter, its standard library and shared libraries, read-only; a few
devices; its own /proc; a fresh size-capped tmpfs at /tmp, its working directory: plan.py), no capabilities,
no_new_privs, rlimits, and runs as nobody when the evaluator is root. Bubblewrap builds the namespaces when installed, else namespaces.py does
through the kernel. Where neither can, only an explicit --allow-weak-sandbox runs samples, with rlimits, the
in-process audit hook and (as root) the nobody user. docs/sandbox.md lists every boundary. Linux only.
"""

import contextlib
import enum
import functools
import json
import marshal
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import NamedTuple, NoReturn

from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.sandbox import plan as sandbox_plan
from sharelora_cli.evaluation.sandbox import wire as sandbox_wire
from sharelora_cli.evaluation.sandbox.cleanup import remove_tree
from sharelora_cli.evaluation.sandbox.namespaces import SETUP_FAILED

NOBODY = 65534
RESULT_CHARS = 300  # the most of any text from a sample that reaches a result
# The child's code travels on stdin (child.py says why); this registers wire and namespaces, then runs child.main.
_BOOTSTRAP = (
    "import marshal, sys\n"
    "bundle = marshal.loads(sys.stdin.buffer.read())\n"
    "for name, source in bundle['code'].items():\n"
    "    sys.modules[name] = module = type(sys)(name)\n"
    "    exec(compile(source, name + '.py', 'exec'), module.__dict__)\n"
    "sys.modules['child'].main(bundle['settings'])\n"
)
_CHILD_MODULES = ("wire", "namespaces", "child")  # in import order
_TEARDOWN_SECONDS = 30  # killing a namespace takes milliseconds; this only bounds a wedged kernel


class Isolation(str, enum.Enum):
    BWRAP = "bwrap"  # bubblewrap builds the namespaces
    KERNEL = "kernel"  # namespaces.py builds them with unshare(2) and mount(2)
    WEAK = "weak"  # no namespaces: rlimits, the audit hook and, as root, the nobody user


class Limits(NamedTuple):
    """What one sample may use; the CPU-time limit is derived from the wall-clock timeout."""

    timeout: float = 3.0  # wall clock for the whole sample: start, top-level code and every call
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20  # stdout, each file the sample writes, each reply
    scratch_mb: int = 16  # the tmpfs at /tmp


class Outcome(NamedTuple):
    """Whether a sample passed, and a one-line result: "passed", "timed out" or "failed: why"."""

    passed: bool
    result: str


class SampleRaised(Exception):
    """A function of the sample raised; the message is its "Type: first line"."""


class SandboxStopped(Exception):
    """The sample can answer no more calls; the message is the result ("timed out", "failed: ...")."""


def choose_isolation(allow_weak: bool) -> Isolation:
    """The strongest isolation this machine allows; without namespaces, WEAK only when the user accepted it."""
    strongest, missing = _strongest_isolation()
    if strongest is not None:
        return strongest
    if allow_weak:
        return Isolation.WEAK
    raise UserError(
        f"the HumanEval sandbox cannot create Linux namespaces here ({missing}): run as root, enable unprivileged"
        " user namespaces or install bubblewrap; or pass --allow-weak-sandbox to rely on the in-process guard"
        " alone (see docs/sandbox.md)"
    )


@functools.cache
def _strongest_isolation() -> tuple[Isolation | None, str]:
    reasons = []
    for isolation in (Isolation.BWRAP, Isolation.KERNEL):
        problem = isolation_problem(isolation)
        if problem is None:
            return isolation, ""
        reasons.append(f"{isolation.value}: {problem}")
    return None, "; ".join(reasons)


def isolation_problem(isolation: Isolation) -> str | None:
    """Why this isolation cannot run a program here, or None if it can: it runs one to find out."""
    if isolation is Isolation.BWRAP and shutil.which("bwrap") is None:
        return "bubblewrap is not installed"
    outcome = run_program("pass", Limits(timeout=60), isolation)  # generous: a busy machine must not refuse
    return None if outcome.passed else outcome.result.removeprefix("failed: ")


def run_program(source: str, limits: Limits = Limits(), isolation: Isolation | None = None) -> Outcome:
    """Run source's top-level code in a sandbox. "passed" only means it ran to its end without raising, as
    the program itself reports; a verdict that must not be forgeable comes from Sandbox.call instead."""
    try:
        with Sandbox(source, limits, isolation):
            return Outcome(True, "passed")
    except SandboxStopped as stop:
        return Outcome(False, str(stop))


class Sandbox:
    """One program in a sandboxed child; `with` starts it and runs its top-level code (SandboxStopped if
    that fails), call() runs one of its functions, leaving the block kills everything it started."""

    def __init__(self, source: str, limits: Limits = Limits(), isolation: Isolation | None = None):
        self.isolation = isolation or choose_isolation(allow_weak=False)
        self.limits = limits
        self.stop_reason: str | None = None  # set once the sample can answer no more, even if a caller swallowed it
        self._source = source
        self._init_pidfd: int | None = None
        self._workdir: str | None = None

    def __enter__(self) -> "Sandbox":
        self._resources = contextlib.ExitStack()
        try:
            self._start()
            message = self._receive()
            if message[0] == "failed":
                self._stop(f"failed: {_one_line(message[1:])}")
            if message != ("ready",):
                self._stop("failed: the sample broke the reply protocol")
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._close()

    def function(self, name: str):
        """A stand-in for the sample's function `name`: arguments go in, plain values come out."""

        def call(*args, **kwargs):
            return self.call(name, *args, **kwargs)

        call.__name__ = name
        return call

    def call(self, name: str, *args, **kwargs):
        if self.stop_reason is not None:
            raise SandboxStopped(self.stop_reason)
        request = sandbox_wire.encode(("call", name, args, kwargs))  # WireError: the caller passed no plain data
        try:
            sandbox_wire.send(self._requests, request, self._deadline)
        except TimeoutError:
            self._stop("timed out")
        except BrokenPipeError:
            self._stop(self._ending())
        message = self._receive()
        if message[0] == "returned" and len(message) == 2:
            return message[1]
        if message[0] == "raised":
            raise SampleRaised(_one_line(message[1:]))
        self._stop("failed: the sample broke the reply protocol")

    def _start(self) -> None:
        self._output = self._resources.enter_context(tempfile.TemporaryFile())
        settings_file = self._resources.enter_context(tempfile.TemporaryFile())
        if self.isolation is Isolation.WEAK:
            self._workdir = tempfile.mkdtemp(prefix="sharelora-sandbox-")
            if os.geteuid() == 0:
                with contextlib.suppress(OSError):  # EINVAL where nobody is unmapped: the child stays root then
                    os.chown(self._workdir, NOBODY, NOBODY)  # the child becomes nobody
        request_read, self._requests = self._pipe(parent_end=1)
        self._replies, reply_write = self._pipe(parent_end=0)
        info_read, info_write = self._pipe(parent_end=0) if self.isolation is not Isolation.WEAK else (None, None)
        child_fds = tuple(fd for fd in (request_read, reply_write, info_write) if fd is not None)
        settings = self._settings(request_read, reply_write, info_write)
        settings_file.write(marshal.dumps({"code": _child_code(), "settings": settings}))
        settings_file.seek(0)
        self._deadline = time.monotonic() + self.limits.timeout
        try:
            # Settings arrive on stdin from an unlinked file; stdout and stderr go to another, read only for its
            # last line, and capped by RLIMIT_FSIZE.
            self._child = subprocess.Popen(
                self._command(info_write),
                stdin=settings_file,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                pass_fds=child_fds,
                cwd=self._workdir or "/",
                env=_child_environment(self._workdir or sandbox_plan.WORKDIR),
                start_new_session=True,
            )
        finally:
            for fd in child_fds:
                os.close(fd)
        os.set_blocking(self._requests, False)
        if info_read is not None:
            self._init_pidfd = self._open_namespace_init(info_read)

    def _pipe(self, parent_end: int) -> tuple[int, int]:
        """A pipe whose parent end is closed with the sandbox; the caller closes the child's end."""
        ends = os.pipe()
        self._resources.callback(os.close, ends[parent_end])
        return ends

    def _settings(self, request_fd: int, reply_fd: int, info_fd: int | None) -> dict:
        settings: dict[str, object] = {
            "source": self._source,
            "isolation": self.isolation.value,
            "request_fd": request_fd,
            "reply_fd": reply_fd,
            "info_fd": info_fd,
            "uid": NOBODY,
            "parent_pid": os.getpid(),
            "cpu_seconds": math.ceil(self.limits.timeout) + 1,  # a backstop: the wall-clock kill comes first
            "memory_bytes": self.limits.memory_mb << 20,
            "max_output_bytes": self.limits.max_output_bytes,
        }
        if self.isolation is Isolation.KERNEL:
            plan = self._plan()._asdict()
            fixed = {
                "workdir": sandbox_plan.WORKDIR,
                "devices": sandbox_plan.DEVICES,
                "dev_links": sandbox_plan.DEV_LINKS,
            }
            settings["plan"] = {**plan, **fixed}
        return settings

    def _plan(self) -> sandbox_plan.Plan:
        try:
            return sandbox_plan.make_plan(self.limits.scratch_mb << 20)
        except (OSError, subprocess.SubprocessError) as err:
            self._stop(f"failed: cannot list what the interpreter needs ({err})")

    def _command(self, info_fd: int | None) -> list[str]:
        python = [sandbox_plan.interpreter(), "-I", "-S", "-B", "-c", _BOOTSTRAP]  # -S: no site-packages
        if self.isolation is not Isolation.BWRAP:
            return python
        options = sandbox_plan.bwrap_arguments(self._plan(), as_root=os.geteuid() == 0)
        return [shutil.which("bwrap") or "bwrap", *options, "--info-fd", str(info_fd), "--", *python]

    def _open_namespace_init(self, info_read: int) -> int | None:
        """A pidfd for PID 1 of the sample's namespace, whose death takes everything in it along."""
        try:
            info = json.loads(_read_all(info_read, self._deadline) or b"null")
        except (TimeoutError, ValueError):  # bwrap and the kernel launcher write one small JSON object
            info = None
        if not isinstance(info, dict) or not isinstance(info.get("child-pid"), int):
            self._stop(self._ending())  # the launcher failed before it started anything
        try:
            pidfd = os.pidfd_open(info["child-pid"])
        except ProcessLookupError:
            return None
        # While the launcher lives it has not reaped init, so the pid cannot have been reused by another process.
        if self._child.poll() is not None:
            os.close(pidfd)
            return None
        return pidfd

    def _receive(self) -> tuple:
        try:
            frame = sandbox_wire.receive(self._replies, self.limits.max_output_bytes, self._deadline)
        except TimeoutError:
            self._stop("timed out")
        except sandbox_wire.WireError as err:
            self._stop(f"failed: {err}")
        if frame is None:
            self._stop(self._ending())
        try:
            message = sandbox_wire.decode(frame)  # linear in the frame's size (wire.py), but charged to this sample
        except sandbox_wire.WireError as err:
            self._stop(f"failed: the sample's reply is {err}")
        if time.monotonic() > self._deadline:
            self._stop("timed out")
        if not (isinstance(message, tuple) and message and all(isinstance(part, str) for part in message[:1])):
            self._stop("failed: the sample broke the reply protocol")
        return message

    def _ending(self) -> str:
        """Why the child stopped answering, from how it ended (waiting for that until the deadline)."""
        try:
            returncode = self._child.wait(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "timed out"
        signum = _killing_signal(returncode, self.isolation)
        if signum is not None:
            return "timed out" if signum == signal.SIGXCPU else f"failed: killed by {signum.name}"
        last_line = _last_line(self._output)
        if returncode == SETUP_FAILED and self.isolation is Isolation.KERNEL:
            return f"failed: {last_line or 'sandbox setup failed'}"
        detail = f" ({last_line})" if last_line else ""
        return f"failed: exited with code {returncode} before finishing{detail}"

    def _stop(self, reason: str) -> NoReturn:
        """Record why the sample can answer no more, kill it and raise SandboxStopped."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self._kill()
        raise SandboxStopped(self.stop_reason)

    def _kill(self) -> None:
        """Kill the namespace's PID 1 (the kernel then kills the rest) and wait until it is gone, or, in the
        weak mode, the child's process group; then reap the child."""
        if self._init_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
            _wait_readable(self._init_pidfd, _TEARDOWN_SECONDS)  # readable once init, and the namespace, are gone
            os.close(self._init_pidfd)
            self._init_pidfd = None
        child = getattr(self, "_child", None)
        if child is not None and child.returncode is None:  # once reaped, its pid may belong to someone else
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()

    def _close(self) -> None:
        self._kill()
        self._resources.close()
        if self._workdir is not None:
            remove_tree(self._workdir)


@functools.cache
def _child_code() -> dict[str, str]:
    return {name: Path(__file__).with_name(f"{name}.py").read_text(encoding="utf-8") for name in _CHILD_MODULES}


def _killing_signal(returncode: int, isolation: Isolation) -> signal.Signals | None:
    """The signal that ended the sample: Popen reports it negative; bwrap and the kernel launcher as 128 + it."""
    number = -returncode if returncode < 0 else returncode - 128 if isolation is not Isolation.WEAK else 0
    return signal.Signals(number) if number in signal.valid_signals() and number > 0 else None


def _child_environment(home: str) -> dict[str, str]:
    """Nothing from the parent's environment: no tokens, keys or proxy settings reach the program."""
    single_thread = dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", **single_thread}


def _read_all(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        if not _wait_readable(fd, deadline - time.monotonic()):
            raise TimeoutError
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _wait_readable(fd: int, seconds: float) -> bool:
    poller = select.poll()  # not select(): descriptors past 1024 are common in a process that loaded torch
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(seconds * 1000))))


def _last_line(handle) -> str:
    """The last non-empty line the child printed, to explain an exit without a reply."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - 4 * RESULT_CHARS))  # enough bytes for RESULT_CHARS characters of UTF-8
    lines = handle.read().decode("utf-8", errors="replace").strip().splitlines()
    return printable(lines[-1].strip()[:RESULT_CHARS]) if lines else ""


def _one_line(parts: tuple) -> str:
    """Text from the sample, as one line of at most RESULT_CHARS characters."""
    text = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else "(no reason given)"
    lines = text.strip().splitlines()
    return printable((lines[0] if lines else "(no reason given)")[:RESULT_CHARS])


def printable(text: str) -> str:
    """text with every control, format, surrogate or private-use character (terminal escapes, NUL, bidi
    overrides, halves of UTF-16 pairs) replaced by U+FFFD, so it can be printed and written as UTF-8."""
    return "".join("\ufffd" if unicodedata.category(char)[0] == "C" else char for char in text)
