"""The file system a sample sees in the strong sandbox: an allowlist, one plan that bubblewrap and the kernel
launcher both build on an empty tmpfs root.

Visible, read-only, each at its host path: the Python interpreter (the real one, not a virtual environment's
link), the directories on its isolated import path (the standard library and lib-dynload; the child runs with
-I -S, so no site-packages, and a site-packages inside the standard library is shown empty), the shared libraries
those load (as `ldd` resolves them for the interpreter and every lib-dynload module: hashlib needs libcrypto),
/etc/ld.so.cache (how the loader finds them), the symbolic links on the way to each and the directories
leading to them (empty but for that way). Also /dev with null, urandom and zero, a fresh /proc for the sample's
PID namespace and a fresh size-capped tmpfs at /tmp (working directory, HOME, TMPDIR). Nothing else of the host:
no checkout (the child's code arrives on stdin), no data, no home directory, no other /tmp.
"""

import functools
import glob
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

WORKDIR = "/tmp"
DEVICES = ("null", "urandom", "zero")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
_LOADER_CACHE = "/etc/ld.so.cache"
_LIBRARY = re.compile(
    r"(/\S+) \(0x[0-9a-f]+\)"
)  # ldd: "libc.so.6 => /lib/.../libc.so.6 (0x...)" or "/lib64/ld-... (0x...)"
_MAX_LINKS = 40  # the kernel's own limit on links followed while resolving one path


class Plan(NamedTuple):
    """What the sample's root holds, in the order it is built: directories, links, read-only binds, empty covers."""

    directories: tuple[str, ...]  # created 0755, leading to what is bound
    symlinks: tuple[tuple[str, str], ...]  # (path, target) as on the host
    binds: tuple[str, ...]  # host files and directories, bound read-only at the same path
    covers: tuple[str, ...]  # directories inside a bind shown empty (site-packages)
    scratch_bytes: int  # size of the tmpfs at /tmp


def interpreter() -> str:
    """The real interpreter behind sys.executable: a virtual environment's python is a link into the checkout."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def make_plan(scratch_bytes: int) -> Plan:
    """The allowlist for this interpreter (computed once per process: it runs the interpreter and ldd)."""
    return Plan(*_view(), scratch_bytes)


@functools.cache
def _view() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]:
    import_path = _isolated_import_path()
    needed = [interpreter(), *import_path, *_libraries(import_path)]
    if os.path.isfile(_LOADER_CACHE):
        needed.append(_LOADER_CACHE)
    links: dict[str, str] = {}
    binds: set[str] = set()
    for path in needed:
        chain, real = _resolve(path)
        links.update(chain)
        binds.add(real)
    binds = _outermost(binds)
    links = {path: target for path, target in links.items() if not _inside_any(path, binds)}
    leading = {str(parent) for path in [*binds, *links] for parent in Path(path).parents if str(parent) != "/"}
    directories = {path for path in leading if not _inside_any(path, binds) and path not in (WORKDIR, "/dev", "/proc")}
    covers = {path for path in _site_packages() if _inside_any(path, binds) and os.path.isdir(path)}
    return tuple(sorted(directories)), tuple(sorted(links.items())), tuple(sorted(binds)), tuple(sorted(covers))


def _isolated_import_path() -> list[str]:
    """sys.path of `python -I -S`, as the child runs: the standard library and lib-dynload (zip files if present)."""
    probe = [interpreter(), "-I", "-S", "-c", "import os, sys; print(os.pathsep.join(sys.path))"]
    text = subprocess.run(probe, capture_output=True, text=True, check=True, timeout=60).stdout
    return [path for path in text.strip().split(os.pathsep) if path and os.path.exists(path)]


def _libraries(import_path: Iterable[str]) -> list[str]:
    """Every shared library the interpreter and its extension modules load, as the dynamic loader resolves them."""
    modules = [module for path in import_path if os.path.isdir(path) for module in glob.glob(f"{path}/**/*.so")]
    found = subprocess.run(["ldd", interpreter(), *modules], capture_output=True, text=True, timeout=120).stdout
    return sorted(set(_LIBRARY.findall(found)))


def _site_packages() -> set[str]:
    """Third-party directories of the base installation, which may lie inside its standard library."""
    import sysconfig

    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    return {os.path.realpath(sysconfig.get_path(kind, vars=base)) for kind in ("purelib", "platlib")}


def _resolve(path: str) -> tuple[dict[str, str], str]:
    """The symbolic links met on the way to path ({link: target}) and the real path at its end."""
    links: dict[str, str] = {}
    pending = list(reversed(Path(path).parts[1:]))
    current = "/"
    while pending:
        name = pending.pop()
        if name in (".", ".."):
            current = os.path.dirname(current) if name == ".." else current
            continue
        candidate = os.path.join(current, name)
        if os.path.islink(candidate):
            if len(links) >= _MAX_LINKS:
                raise OSError(f"too many symbolic links resolving {path}")
            target = os.readlink(candidate)
            links[candidate] = target
            pending.extend(reversed(Path(target).parts[1:] if target.startswith("/") else Path(target).parts))
            current = "/" if target.startswith("/") else current
        else:
            current = candidate
    return links, current


def bwrap_arguments(plan: Plan, as_root: bool) -> list[str]:
    """bubblewrap's options for the plan. As root there is no user namespace: the child switches to nobody itself,
    for which it keeps CAP_SETUID/CAP_SETGID until then; otherwise bwrap maps the caller's uid and drops them all."""
    args = ["--die-with-parent", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try"]
    args += (
        ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if as_root else ["--unshare-user"]
    )
    # /tmp first: a bind that lies under the host's /tmp (a venv there, say) is then made inside the fresh one.
    args += ["--perms", "1777", "--size", str(plan.scratch_bytes), "--tmpfs", WORKDIR]
    for directory in plan.directories:  # bwrap would create them 0700, closed to nobody
        args += ["--perms", "0755", "--dir", directory]
    for path, target in plan.symlinks:
        args += ["--symlink", target, path]
    for path in plan.binds:
        args += ["--ro-bind", path, path]
    for path in plan.covers:
        args += ["--perms", "0755", "--size", "4096", "--tmpfs", path, "--remount-ro", path]
    args += ["--perms", "0755", "--dir", "/dev"]
    for name in DEVICES:
        args += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    for name, target in DEV_LINKS.items():
        args += ["--symlink", target, f"/dev/{name}"]
    args += ["--proc", "/proc", "--chdir", WORKDIR, "--remount-ro", "/"]
    return args


def _inside_any(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _outermost(paths: set[str]) -> set[str]:
    """Drop every path that lies inside another one of the set."""
    return {path for path in paths if not _inside_any(path, paths - {path})}
