"""Directories that appear complete or not at all: write beside, fsync, rename."""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of target; on success it is renamed to target, on failure removed.

    A crash at any point leaves either the old target or the new one, never a half-written one:
    the rename is atomic within a filesystem, and files are fsynced before it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(trash)
            staging.rename(target)
            shutil.rmtree(trash)
        else:
            staging.rename(target)
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def remove_directory(path: Path) -> None:
    """Delete a directory so that it vanishes at once: rename it aside, then remove that."""
    trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_staging(parent: Path) -> None:
    """Delete temporary directories left by a process killed mid-write."""
    for leftover in Path(parent).glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in Path(parent).glob(".*.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
