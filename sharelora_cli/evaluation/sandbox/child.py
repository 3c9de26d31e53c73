"""The sandboxed side of sandbox.Sandbox: contain this process, run the program, answer calls.

Not a file the child opens: session.py sends this module's source, wire.py's and namespaces.py's on stdin with
the settings (marshal), and `python -I -S -c BOOTSTRAP` runs them, so the sample's view needs no checkout.
Then: stdin becomes /dev/null; with isolation "kernel" the launcher in namespaces.py builds the namespaces and
mounts (under bubblewrap they exist already); as root it becomes nobody; it keeps no capabilities and sets
no_new_privs, checking both; rlimits; an audit hook that refuses processes, signals, sockets, native calls and
file access outside the working directory. The namespaces are the boundary; the hook is defence in depth. In the
"weak" mode there are no namespaces and the hook does more work.

Then it runs the program's top-level code and replies ("ready",) or ("failed", why); after that it answers each
("call", name, args, kwargs) with ("returned", value) or ("raised", why) until the parent closes the request pipe.
Every message is plain data (wire.py), so nothing the program builds reaches the parent but values.
Standard library only and few imports: it starts once per sample.
"""

import ctypes
import os
import resource
import signal
import sys

import namespaces  # registered by the bootstrap (session.py) before this module runs
import wire

_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_DAC_READ_SEARCH = 2

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


def main(settings: dict) -> None:
    _detach_stdin()
    os.environ.pop("PWD", None)  # bwrap --chdir exports it; every mode shows the program the same environment
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        if settings["isolation"] == "kernel":
            _die_with_parent(libc, settings["parent_pid"])  # the launcher; init then dies with it, and the rest
            samples_fds = (settings["request_fd"], settings["reply_fd"])
            namespaces.enter(settings["plan"], settings["info_fd"], samples_fds)
        if settings["isolation"] == "weak":
            _contain_weakly(libc, settings)
        else:
            _drop_privileges(libc, settings["uid"])
    except namespaces.SetupError as err:
        print(f"sandbox setup failed: {err}", file=sys.stderr, flush=True)
        os._exit(namespaces.SETUP_FAILED)
    _set_limits(settings)
    _refuse_unaudited_signallers()
    sys.addaudithook(_Guard(os.getcwd(), _readable_roots()))  # cannot be removed once added
    _serve(settings)


def _serve(settings: dict) -> None:
    """Run the program, then answer calls until the request pipe closes; every reply is plain data."""
    requests, replies, max_bytes = settings["request_fd"], settings["reply_fd"], settings["max_output_bytes"]
    namespace = {"__name__": "__sample__"}
    try:
        exec(compile(settings.pop("source"), "<sample>", "exec"), namespace)
        _flush_output()  # output beyond the size limit fails here rather than vanishing unnoticed
    except BaseException as err:  # SystemExit and KeyboardInterrupt from the program are failures too
        wire.send(replies, wire.encode(("failed", wire.describe(err))))
        os._exit(1)
    wire.send(replies, wire.encode(("ready",)))
    while (request := wire.receive(requests, max_bytes)) is not None:
        _, name, args, kwargs = wire.decode(request)
        try:
            reply = wire.encode(("returned", _function(namespace, name)(*args, **kwargs)))
            _flush_output()
        except BaseException as err:
            reply = wire.encode(("raised", wire.describe(err)))
        wire.send(replies, reply)
    os._exit(0)  # skip atexit handlers the program may have registered


def _function(namespace: dict, name: str):
    function = namespace.get(name)
    if not callable(function):
        raise NameError(f"the program defines no function {name!r}")
    return function


def _detach_stdin() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _drop_privileges(libc: ctypes.CDLL, uid: int) -> None:
    """Inside the namespaces: root becomes `uid` (nobody); every capability goes, also those a user namespace
    grants; no_new_privs keeps setuid binaries and file capabilities from handing any back. Checked, not assumed."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # without PR_SET_KEEPCAPS the kernel clears every capability here
    namespaces.set_capabilities(libc, 0)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.geteuid() == 0 or namespaces.capabilities_held(libc) or libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise namespaces.SetupError("could not drop root, capabilities or set no_new_privs")


def _contain_weakly(libc: ctypes.CDLL, settings: dict) -> None:
    """No namespaces of our own: as root, a private network and the nobody user; death with the parent."""
    if os.geteuid() == 0:
        libc.unshare(_CLONE_NEWNET)  # best effort: containers often deny it, and the socket refusal remains
        _become_nobody_keeping_reads(libc, settings["uid"])
    _die_with_parent(libc, settings["parent_pid"])


def _become_nobody_keeping_reads(libc: ctypes.CDLL, uid: int) -> None:
    """Switch to nobody so the kernel refuses writes, deletes and signals outside the working directory.

    CAP_DAC_READ_SEARCH is kept when held, so an interpreter installed under a private home such as /root
    can still import its standard library (no mount namespace re-exposes it); the audit hook limits reads.
    """
    libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except PermissionError:  # root without CAP_SETUID: a locked-down container, which is then the boundary
        return
    if not namespaces.set_capabilities(libc, 1 << _CAP_DAC_READ_SEARCH):
        namespaces.set_capabilities(libc, 0)  # not held: keep no capability at all
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
            raise PermissionError(
                f"sandbox: writing {os.fsdecode(path)!r} is not allowed outside the working directory"
            )

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


def _flush_output() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
