"""The strong sandbox's file-system plan: an allowlist derived from the interpreter, and bwrap's arguments for it."""

import os
import re
import subprocess
import sys
import sysconfig

from sharelora_cli.core.paths import PROJECT_ROOT, data_dir
from sharelora_cli.evaluation.sandbox.plan import WORKDIR, bwrap_arguments, interpreter, make_plan


def _inside(path: str, root) -> bool:
    root = os.path.realpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def test_the_plan_binds_the_interpreter_its_stdlib_and_the_libraries_hashlib_needs():
    plan = make_plan(1 << 20)
    assert interpreter() in plan.binds and interpreter() == os.path.realpath(sys._base_executable)
    assert os.path.realpath(os.path.dirname(os.__file__)) in plan.binds  # the standard library
    import _hashlib  # an extension module in lib-dynload, linked against libcrypto

    linked = subprocess.run(["ldd", _hashlib.__file__], capture_output=True, text=True, check=True).stdout
    libraries = {os.path.realpath(path) for path in re.findall(r"(/\S+) \(0x", linked)}
    assert libraries and all(any(_inside(library, bound) for bound in plan.binds) for library in libraries)


def test_nothing_of_the_checkout_the_venv_the_data_or_site_packages_is_bound():
    plan = make_plan(1 << 20)
    everything = [*plan.binds, *plan.directories, *(path for path, _ in plan.symlinks)]
    for root in (PROJECT_ROOT, sys.prefix, data_dir()):
        assert not [path for path in everything if _inside(path, root)], root
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    site_packages = os.path.realpath(sysconfig.get_path("purelib", vars=base))
    assert site_packages not in plan.binds
    assert site_packages in plan.covers or not any(_inside(site_packages, bound) for bound in plan.binds)


def test_links_on_the_way_are_recreated_and_directories_lead_to_every_bind():
    plan = make_plan(1 << 20)
    assert all(os.readlink(path) == target for path, target in plan.symlinks)
    for path in [*plan.binds, *(link for link, _ in plan.symlinks)]:
        parent = os.path.dirname(path)
        assert parent == "/" or parent in plan.directories or any(_inside(parent, bound) for bound in plan.binds)


def test_bwrap_builds_the_same_view_on_an_empty_root_with_tmp_first():
    plan = make_plan(4096)
    args = bwrap_arguments(plan, as_root=True)
    assert "/" not in [args[i + 1] for i, arg in enumerate(args) if arg == "--ro-bind"]  # no host root
    tmp = args.index("--tmpfs")
    assert args[tmp - 4 : tmp + 2] == ["--perms", "1777", "--size", "4096", "--tmpfs", WORKDIR]
    first_bind = args.index("--ro-bind")
    assert tmp < first_bind  # a bind under the host's /tmp lands inside the fresh one, not under it
    binds = [args[i + 1] for i, arg in enumerate(args) if arg == "--ro-bind"]
    assert binds == list(plan.binds)
    directories = [args[i + 1] for i, arg in enumerate(args) if arg == "--dir"]
    assert directories == [*plan.directories, "/dev"]
    assert all(args[args.index(path) - 2 : args.index(path)] == ["0755", "--dir"] for path in plan.directories)
    assert args[-2:] == ["--remount-ro", "/"]
    assert "--unshare-user" not in args and "--unshare-user" in bwrap_arguments(plan, as_root=False)
