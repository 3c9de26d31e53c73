"""The file system a sample sees in the strong sandbox, as one plan that bubblewrap and the kernel launcher both build.

The host's tree, read-only, except: home directories, /run (daemons' sockets: a socket file on a read-only mount
still accepts connections), the benchmark data directory and any path the caller names (e.g. the problems file)
are covered by empty read-only directories or files; Python's installation, its site-packages and the sandbox's
own code are mounted back where they lie inside those; /dev holds only a few harmless devices; /proc is a fresh
one for the sample's PID namespace; /tmp (the working directory, also HOME and TMPDIR) and /dev/shm are fresh,
size-capped tmpfs mounts that vanish with the namespace.
"""

import os
import site
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from sharelora_cli.core.paths import data_dir

WORKDIR = "/tmp"
DEVICES = ("null", "zero", "full", "random", "urandom")
_ALWAYS_HIDDEN = ("/root", "/home", "/run")


class Plan(NamedTuple):
    """Ordered steps ("hide", path), ("hide_file", path), ("expose", path), then the fixed mounts."""

    steps: tuple[tuple[str, str], ...]
    scratch_bytes: int  # size of each of the /tmp and /dev/shm tmpfs mounts


def make_plan(hidden: Iterable[str | os.PathLike], needed: Iterable[str], scratch_bytes: int) -> Plan:
    """Hide the default secrets plus `hidden`; mount back the `needed` directories that fall inside them."""
    home = os.path.expanduser("~")  # unlike Path.home(), no error where HOME is unset and the user unknown
    secrets = {_real(path) for path in (*_ALWAYS_HIDDEN, home, data_dir(), *hidden)}
    secrets = {path for path in secrets if os.path.lexists(path) and path != "/"}
    exposed = _outermost({_real(path) for path in needed if os.path.isdir(path) and _inside_any(_real(path), secrets)})
    covered = _outermost(secrets)
    # A secret inside an exposed directory (data under site-packages, say) is covered again after the exposure.
    uncovered_again = sorted(_outermost({path for path in secrets if _inside_any(path, exposed)}))
    steps = [_hide(path) for path in sorted(covered)] + [("expose", path) for path in sorted(exposed)]
    steps += [_hide(path) for path in uncovered_again]
    return Plan(tuple(steps), scratch_bytes)


def child_needs(child_script: str) -> list[str]:
    """What the sandboxed interpreter reads: its installation, site-packages and the sandbox's own code."""
    return [
        sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(),
        os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.realpath(child_script)),
    ]  # fmt: skip


def bwrap_arguments(plan: Plan, as_root: bool) -> list[str]:
    """bubblewrap's options for the plan. As root there is no user namespace: the child switches to nobody itself,
    for which it keeps CAP_SETUID/CAP_SETGID until then; otherwise bwrap maps the caller's uid and drops them all."""
    size = str(plan.scratch_bytes)
    covered = [path for action, path in plan.steps if action == "hide"]
    args = [
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    args += (
        ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if as_root else ["--unshare-user"]
    )
    args += ["--ro-bind", "/", "/"]
    read_only_afterwards = []
    for action, path in plan.steps:
        if action == "hide":
            args += ["--perms", "0755", "--tmpfs", path]
            read_only_afterwards += ["--remount-ro", path]
        elif action == "hide_file":
            args += ["--ro-bind", "/dev/null", path]
        else:  # bwrap would create the directories leading there as 0700, closed to nobody
            for directory in _directories_between(
                max((root for root in covered if _inside_any(path, [root])), key=len), path
            ):
                args += ["--perms", "0755", "--dir", directory]
            args += ["--ro-bind", path, path]
    args += ["--dev", "/dev", "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm", "--proc", "/proc"]
    args += ["--perms", "1777", "--size", size, "--tmpfs", WORKDIR, "--chdir", WORKDIR]
    return args + read_only_afterwards


def _directories_between(root: str, path: str) -> list[str]:
    """The directories strictly between root and path, outermost first."""
    relative = Path(path).relative_to(root)
    return [os.path.join(root, parent) for parent in reversed(relative.parents) if parent != Path(".")]


def _hide(path: str) -> tuple[str, str]:
    return ("hide" if os.path.isdir(path) else "hide_file", path)


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


def _inside_any(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _outermost(paths: set[str]) -> set[str]:
    """Drop every path that lies inside another one of the set."""
    return {path for path in paths if not _inside_any(path, paths - {path})}
