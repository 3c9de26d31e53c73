"""The kernel launcher: bubblewrap's isolation built directly with unshare(2), mount(2) and the new mount API.

child.py calls enter() before any sample code when bubblewrap is not installed. Three processes result:

    launcher (host namespaces, waits)  ->  init (PID 1 of a new PID namespace, builds the mounts, reaps)  ->  sample

The launcher writes {"child-pid": init} to the info descriptor, as `bwrap --info-fd` does, so the parent can kill
init; when a namespace's PID 1 dies the kernel kills everything else in it, so nothing the sample starts outlives
the run. As root the namespaces need no user namespace (the sample then becomes nobody); otherwise a user
namespace maps the caller's own uid. Exit codes follow bubblewrap: the sample's own, or 128 + the signal that
killed it; SETUP_FAILED, with one line on stderr, when the namespaces or mounts could not be built.
The file system is the allowlist of plan.py: init builds it on a fresh tmpfs and pivots into it, so the host's
tree is not under it at all. Standard library only (it runs in the child interpreter); Linux 5.12+ (open_tree,
move_mount, mount_setattr).
"""

import ctypes
import json
import os
import platform
import select
import signal
import sys

SETUP_FAILED = 125

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 1, 2, 4, 8, 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 1, 2, 4
_AT_FDCWD, _AT_RECURSIVE, _OPEN_TREE_CLONE, _MOVE_MOUNT_F_EMPTY_PATH = -100, 0x8000, 1, 4
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # one number on every architecture
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4
_CAPABILITY_VERSION_3 = 0x20080522
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_MNT_DETACH = 2


class SetupError(Exception):
    """The namespaces or mounts could not be built: the step and the kernel's reason, in one line."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def set_capabilities(libc: ctypes.CDLL, keep: int) -> bool:
    """Keep only the capabilities in the bit mask `keep` (0: none, also of those a user namespace grants)."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    return libc.capset(ctypes.byref(header), (_CapData * 2)(_CapData(keep, keep, 0))) == 0


def capabilities_held(libc: ctypes.CDLL) -> bool:
    held = (_CapData * 2)()
    libc.capget(ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), held)
    return any(data.effective or data.permitted for data in held)


def renounce_privileges(libc: ctypes.CDLL) -> None:
    """No capability, and non-dumpable: a process of the same uid can then neither ptrace this one nor open
    its /proc/<pid>/mem."""
    set_capabilities(libc, 0)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def enter(plan: dict, info_fd: int, samples_fds: tuple[int, ...]) -> None:
    """Build the namespaces and mounts; returns only in the sample process, inside them, in the working directory.

    plan: plan.Plan as a dict plus "workdir" and "devices"; samples_fds: descriptors only the sample keeps.
    """
    libc = _libc()
    as_root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    kinds = "mount, pid, net, ipc, uts namespaces" if as_root else "user, mount, pid, net, ipc, uts namespaces"
    _check(libc.unshare(flags if as_root else flags | _CLONE_NEWUSER), f"unshare({kinds})")
    if not as_root:
        _map_own_user(uid, gid)
    alive_read, alive_write = os.pipe()  # closes when the launcher dies, however it dies
    init = os.fork()
    if init:
        os.close(alive_read)
        _run_launcher(init, info_fd, samples_fds)
    os.close(alive_write)
    os.close(info_fd)
    _die_with_launcher(libc, alive_read)
    try:
        _build_file_system(libc, plan)
    except (SetupError, OSError) as err:
        print(f"sandbox setup failed: {err}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    go_read, go_write = os.pipe()
    sample = os.fork()
    if sample:
        os.close(go_read)
        renounce_privileges(libc)  # reaping needs none, so a sample that reached init would find none
        os.close(go_write)
        _run_init(sample, samples_fds)
    os.close(go_write)
    os.read(go_read, 1)  # returns at end of file: once init has renounced its privileges
    os.close(go_read)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, step: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise SetupError(f"{step}: {os.strerror(error)}")
    return result


def _map_own_user(uid: int, gid: int) -> None:
    """In the new user namespace the caller keeps its own uid and gid (and nothing else is mapped)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
        except OSError as err:
            raise SetupError(f"writing /proc/self/{name}: {err.strerror}") from None


def _run_launcher(init: int, info_fd: int, samples_fds: tuple[int, ...]) -> None:
    for fd in samples_fds:
        os.close(fd)
    os.write(info_fd, json.dumps({"child-pid": init}).encode())
    os.close(info_fd)
    _, status = os.waitpid(init, 0)
    os._exit(_exit_code(status))


def _run_init(sample: int, samples_fds: tuple[int, ...]) -> None:
    """PID 1: reap whatever dies in the namespace and leave with the sample's status."""
    for fd in samples_fds:
        os.close(fd)
    while True:
        pid, status = os.wait()
        if pid == sample:
            os._exit(_exit_code(status))


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _die_with_launcher(libc: ctypes.CDLL, alive_read: int) -> None:
    """Should the launcher die, init is killed, and with it the namespace. The launcher is not visible from
    inside the new PID namespace (getppid() is 0), so its pipe tells whether it died before the signal was armed."""
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    poller = select.poll()
    poller.register(alive_read, select.POLLIN)
    if poller.poll(0):
        os._exit(SETUP_FAILED)
    os.close(alive_read)


def _build_file_system(libc: ctypes.CDLL, plan: dict) -> None:
    """A tmpfs root holding only the plan's allowlist (plan.py), pivoted into; the host's tree is then detached."""
    os.umask(0o022)
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing done here reaches the host
    # Clones first: the new root is mounted over the host's /tmp, under which a needed path may lie.
    clones = {path: (_clone(libc, path), os.path.isdir(path)) for path in plan["binds"]}
    devices = {name: _clone(libc, f"/dev/{name}") for name in plan["devices"]}
    root = plan["workdir"]
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")

    def inside(path: str) -> str:  # where a path of the plan (always absolute) lies before the pivot
        return root + path

    for path in ("/dev", "/proc", plan["workdir"]):
        os.makedirs(inside(path), exist_ok=True)
    scratch = f"mode=1777,size={plan['scratch_bytes']}"
    _mount(libc, "tmpfs", inside(plan["workdir"]), "tmpfs", _MS_NOSUID | _MS_NODEV, scratch)  # before binds under it
    for path in plan["directories"]:
        os.makedirs(inside(path), exist_ok=True)
    for path, target in plan["symlinks"]:
        os.symlink(target, inside(path))
    for path, (clone, is_directory) in clones.items():
        _attach(libc, clone, _mount_point(inside(path), is_directory))
    for path in plan["covers"]:
        _mount(libc, "tmpfs", inside(path), "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "mode=0755,size=4k")
    _set_attributes(libc, root, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, recursive=True)
    _clear_attributes(libc, inside(plan["workdir"]), _MOUNT_ATTR_RDONLY)
    _build_dev(libc, inside("/dev"), devices, plan["dev_links"])
    _mount_proc(libc, inside("/proc"))  # while the host's /proc is still in this namespace (see _mount_proc)
    _pivot_into(libc, root)
    os.chdir(plan["workdir"])


def _mount_point(path: str, is_directory: bool) -> str:
    """path, created as an empty directory or file for a bind of that kind to be attached on."""
    if is_directory:
        os.makedirs(path, exist_ok=True)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    return path


def _pivot_into(libc: ctypes.CDLL, root: str) -> None:
    """Make root the root directory and detach the host's tree: pivot_root(".", ".") stacks the old root on the
    new one, and unmounting "." takes it away (no directory for it needed)."""
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise SetupError(f"pivot_root: no system call number known for {platform.machine()}")
    os.chdir(root)
    _check(libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
    _check(libc.umount2(b".", _MNT_DETACH), "detaching the host's root")
    os.chdir("/")


def _build_dev(libc: ctypes.CDLL, dev: str, devices: dict[str, int], links: dict[str, str]) -> None:
    """/dev with the plan's devices (bound from the host) and the usual links, read-only."""
    _mount(libc, "tmpfs", dev, "tmpfs", _MS_NOSUID, "mode=0755,size=64k")
    for name, clone in devices.items():
        _attach(libc, clone, _mount_point(f"{dev}/{name}", is_directory=False))
    for name, target in links.items():
        os.symlink(target, f"{dev}/{name}")
    _set_attributes(libc, dev, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, recursive=False)


def _mount_proc(libc: ctypes.CDLL, target: str) -> None:
    """A /proc that shows only the sample's PID namespace. A user namespace may mount one only while a fully
    visible one is in its mount namespace: not where the host's /proc is partly covered (as in many containers);
    /proc is then an empty directory."""
    try:
        _mount(libc, "proc", target, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except SetupError:
        _mount(libc, "tmpfs", target, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "mode=0555,size=4k")


def _mount(libc: ctypes.CDLL, source, target: str, fstype, flags: int, options: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    result = libc.mount(encode(source), target.encode(), encode(fstype), flags, encode(options))
    _check(result, f"mount {fstype or 'propagation'} on {target}")


def _clone(libc: ctypes.CDLL, path: str) -> int:
    """A detached copy of the mount at path, to attach elsewhere later."""
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC
    args = (ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_long(_AT_FDCWD), path.encode(), ctypes.c_long(flags))
    return _check(libc.syscall(*args), f"open_tree {path}")


def _attach(libc: ctypes.CDLL, clone: int, target: str) -> None:
    args = (ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_long(clone), b"", ctypes.c_long(_AT_FDCWD), target.encode())
    _check(libc.syscall(*args, ctypes.c_long(_MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount to {target}")
    os.close(clone)


def _set_attributes(libc: ctypes.CDLL, path: str, flags: int, recursive: bool, clear: bool = False) -> None:
    attributes = _MountAttr(attr_clr=flags) if clear else _MountAttr(attr_set=flags)
    args = (ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), path.encode())
    size = ctypes.c_long(ctypes.sizeof(attributes))
    result = libc.syscall(*args, ctypes.c_long(_AT_RECURSIVE if recursive else 0), ctypes.byref(attributes), size)
    _check(result, f"mount_setattr {'clearing' if clear else 'setting'} {flags:#x} on {path}")


def _clear_attributes(libc: ctypes.CDLL, path: str, flags: int) -> None:
    _set_attributes(libc, path, flags, recursive=False, clear=True)
