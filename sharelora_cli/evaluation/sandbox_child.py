"""The sandboxed side of sandbox.run_program, run as a script: contain this process, run the program, report.

Reads its settings (marshal-encoded) from stdin, then: stdin becomes /dev/null; as root, a private network
namespace and the nobody user; rlimits; death with the parent; an audit hook that refuses processes,
signals, sockets, native calls and file access outside the working directory. A pass is reported by
writing the parent's secret nonce to the verdict descriptor, so a program that exits early cannot pass.
Standard library only and few imports: it starts once per sample.
"""

import ctypes
import marshal
import os
import resource
import signal
import sys

NOBODY = 65534
VERDICT_BYTES = 400  # the parent reads at most this much: one line of failure reason

_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_CAP_DAC_READ_SEARCH = 2
_CAPABILITY_VERSION_3 = 0x20080522

# Audit events (raised inside CPython's C functions, so a re-imported module cannot dodge them) that a
# correct solution never needs: new processes, signals, links that alias files outside the working
# directory, changing directory (relative paths would then escape the checks below), other processes'
# limits. Whole families go too: socket.* (network), ctypes.* (raw memory and syscalls) and sqlite3.*
# (it opens files in C, past the "open" event).
_REFUSED_EVENTS = frozenset(
    {
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "subprocess.Popen",
        "os.kill", "os.killpg", "os.link", "os.symlink", "os.chdir", "resource.prlimit",
    }
)  # fmt: skip
_REFUSED_PREFIXES = ("socket.", "ctypes.", "sqlite3.")
# Events that change the file system, and which of their arguments are paths (ints are open descriptors).
_WRITE_EVENTS = {
    "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,),
    "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_READABLE_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"})
# Signalling through a pidfd raises no audit event; these two are replaced instead (a speed bump only).
_UNAUDITED_SIGNALLERS = {
    "os": "pidfd_open", "posix": "pidfd_open", "signal": "pidfd_send_signal", "_signal": "pidfd_send_signal",
}  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def main() -> None:
    settings = marshal.loads(sys.stdin.buffer.read())
    _detach_stdin()
    sys.path.extend(settings["site_packages"])  # third-party imports work as in the parent
    libc = ctypes.CDLL(None, use_errno=True)
    _enter_private_network(libc)
    _become_nobody(libc)
    _set_limits(settings)
    _die_with_parent(libc, settings["parent_pid"])
    _refuse_unaudited_signallers()
    sys.addaudithook(_Guard(os.getcwd(), _readable_roots()))  # cannot be removed once added
    verdict_fd, nonce = settings["verdict_fd"], settings["nonce"]
    try:
        exec(compile(settings.pop("source"), "<sample>", "exec"), {"__name__": "__sample__"})
        _flush_output()  # output beyond the size limit fails here rather than vanishing unnoticed
    except BaseException as err:  # SystemExit and KeyboardInterrupt from the program are failures too
        _report(verdict_fd, _describe(err))
        os._exit(1)
    _report(verdict_fd, nonce)
    os._exit(0)  # skip atexit handlers the program may have registered


def _detach_stdin() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _enter_private_network(libc: ctypes.CDLL) -> None:
    """A new network namespace has only a downed loopback: no host ports, no outside world (root only)."""
    if os.geteuid() == 0:
        libc.unshare(_CLONE_NEWNET)  # best effort: containers often deny it, and the socket refusal remains


def _become_nobody(libc: ctypes.CDLL) -> None:
    """As root, switch to nobody so the kernel refuses writes, deletes and signals outside the sandbox.

    CAP_DAC_READ_SEARCH is kept when held, so an interpreter installed under a private home such as /root
    can still import its standard library; the audit hook limits what else the program may read.
    """
    if os.geteuid() != 0:
        return
    libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except PermissionError:  # root without CAP_SETUID: a locked-down container, which is then the boundary
        return
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    keep = 1 << _CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), (_CapData * 2)(_CapData(keep, keep, 0))) != 0:
        libc.capset(ctypes.byref(header), (_CapData * 2)())  # not held: keep no capability at all
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can hand privileges back


def _set_limits(settings: dict) -> None:
    """Hard limits equal soft ones (CPU: one second above), so the program cannot raise them back."""
    cpu, memory, output = settings["cpu_seconds"], settings["memory_bytes"], settings["max_output_bytes"]
    for kind, soft, hard in (
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_FSIZE, output, output),  # bounds stdout and every file the program writes
        (resource.RLIMIT_NPROC, 0, 0),  # no new processes or threads (not enforced for root)
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(kind, (soft, hard))


def _die_with_parent(libc: ctypes.CDLL, parent_pid: int) -> None:
    """If the evaluator dies, so does the child (set after the uid switch, which clears it)."""
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _refuse_unaudited_signallers() -> None:
    for module_name, name in _UNAUDITED_SIGNALLERS.items():
        setattr(sys.modules[module_name], name, _refusal(f"{module_name}.{name}"))


def _refusal(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is not allowed")

    return refuse


def _readable_roots() -> tuple[str, ...]:
    """Python's installation, its import path and the time-zone database: what a program may read besides
    its working directory."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path, "/usr/share/zoneinfo"}
    return tuple(os.path.realpath(root) for root in roots if root)


class _Guard:
    """The audit hook: refuses whole kinds of events, keeps writes inside the working directory and reads
    inside Python's installation, the working directory and a few devices."""

    def __init__(self, workdir: str, readable_roots: tuple[str, ...]):
        self.workdir = os.path.realpath(workdir)
        self.readable_roots = readable_roots

    def __call__(self, event: str, args: tuple) -> None:
        if event in _REFUSED_EVENTS or event.startswith(_REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, _mode, flags = args
            if flags & _WRITE_FLAGS:
                self._check_write(path)
            else:
                self._check_read(path, handle=True)
        elif event in ("os.listdir", "os.scandir"):
            self._check_read(args[0], handle=False)
        elif event in _WRITE_EVENTS:
            for index in _WRITE_EVENTS[event]:
                self._check_write(args[index])

    def _check_write(self, path) -> None:
        if not isinstance(path, int) and not _within(_resolve(path), self.workdir):
            raise PermissionError(f"sandbox: writing {os.fsdecode(path)!r} is not allowed outside the working directory")

    def _check_read(self, path, handle: bool) -> None:
        if path is None or isinstance(path, int):
            return
        resolved = _resolve(path)
        if _within(resolved, self.workdir):
            return
        readable = resolved in _READABLE_DEVICES or any(_within(resolved, root) for root in self.readable_roots)
        # A directory handle outside would let dir_fd-relative writes land outside the working directory.
        if not readable or (handle and os.path.isdir(resolved)):
            raise PermissionError(f"sandbox: reading {os.fsdecode(path)!r} is not allowed")


def _resolve(path) -> str:
    return os.path.realpath(os.fsdecode(path))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _describe(err: BaseException) -> str:
    """"failed: Type: first line of the message", the reason recorded for a failing sample."""
    try:
        lines = str(err).strip().splitlines()
    except Exception:  # a hostile __str__ must not cost the verdict
        lines = []
    return f"failed: {type(err).__name__}: {lines[0]}" if lines else f"failed: {type(err).__name__}"


def _flush_output() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


def _report(verdict_fd: int, verdict: str) -> None:
    os.write(verdict_fd, verdict.encode("utf-8", errors="replace")[:VERDICT_BYTES])


if __name__ == "__main__":
    main()
