"""The strong sandbox's file-system plan: what is covered, what is mounted back, in which order."""

import os

from sharelora_cli.core.paths import data_dir
from sharelora_cli.evaluation.sandbox.plan import bwrap_arguments, make_plan


def _steps_under(plan, root) -> list[tuple[str, str]]:
    return [(action, os.path.relpath(path, root)) for action, path in plan.steps if path.startswith(f"{root}/")]


def test_needed_directories_inside_covered_ones_come_back_and_secrets_inside_those_are_covered_again(tmp_path):
    root = os.path.realpath(tmp_path)
    for directory in ("home/lib/python", "home/other", "data"):
        os.makedirs(os.path.join(root, directory))
    for secret in ("home/lib/python/token", "home/other/key", "data/problems.jsonl"):
        open(os.path.join(root, secret), "w").close()
    hidden = [f"{root}/home", f"{root}/home/lib/python/token", f"{root}/home/other/key", f"{root}/data/problems.jsonl"]
    needed = [f"{root}/home/lib/python", f"{root}/home/lib/python/sub", f"{root}/elsewhere"]
    plan = make_plan(hidden, needed, scratch_bytes=1 << 20)
    assert _steps_under(plan, root) == [
        ("hide_file", "data/problems.jsonl"),  # a file: covered by itself, its directory stays visible
        ("hide", "home"),
        ("expose", "home/lib/python"),  # inside a covered directory: mounted back
        ("hide_file", "home/lib/python/token"),  # inside what came back: covered again
    ]  # home/other/key lies inside covered home already; needed paths outside any covered one need nothing


def test_home_directories_runtime_sockets_and_the_data_directory_are_always_covered():
    covered = {path for action, path in make_plan([], [], 1 << 20).steps if action in ("hide", "hide_file")}
    expected = {os.path.realpath(path) for path in ("/root", "/home", "/run", os.path.expanduser("~"), data_dir())}
    outermost = {
        path
        for path in expected
        if os.path.lexists(path) and not any(path.startswith(f"{other}/") for other in expected)
    }
    assert outermost <= covered


def test_bwrap_opens_the_way_to_an_exposed_directory_and_makes_covers_read_only(tmp_path):
    root = os.path.realpath(tmp_path)
    os.makedirs(f"{root}/home/a/b/python")
    plan = make_plan([f"{root}/home"], [f"{root}/home/a/b/python"], scratch_bytes=4096)
    args = bwrap_arguments(plan, as_root=True)
    expose = args.index(f"{root}/home/a/b/python")
    # bwrap would create home/a and home/a/b as 0700, which nobody could not pass through.
    assert args[expose - 9 : expose + 2] == [
        "--perms", "0755", "--dir", f"{root}/home/a", "--perms", "0755", "--dir", f"{root}/home/a/b",
        "--ro-bind", f"{root}/home/a/b/python", f"{root}/home/a/b/python",
    ]  # fmt: skip
    remount = next(i for i in range(len(args)) if args[i : i + 2] == ["--remount-ro", f"{root}/home"])
    assert remount > expose  # read-only only once the way to the exposed directory exists
    tmp = args.index("--chdir") - 1
    assert args[tmp - 5 : tmp + 3] == ["--perms", "1777", "--size", "4096", "--tmpfs", "/tmp", "--chdir", "/tmp"]
    assert "--unshare-user" not in args and "--unshare-user" in bwrap_arguments(plan, as_root=False)
