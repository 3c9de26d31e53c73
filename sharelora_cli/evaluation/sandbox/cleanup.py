"""Delete a directory tree a sample built, whatever it looks like, without ever raising.

Only the weak sandbox leaves a working directory on disk (the strong one's tmpfs vanishes with its namespace).
A sample controls that tree: it can nest it thousands of levels deep (past PATH_MAX and Python's recursion
limit, which is what broke shutil.rmtree), make directories unreadable (chmod 000) or plant symlinks. So the
tree is flattened instead of walked: the children of a non-empty subdirectory are renamed up into the root,
and all work goes through descriptors relative to the root, never through long paths. Each pass removes a level.
"""

import itertools
import os
import secrets

_MAX_PASSES = 100_000  # a tree built in seconds has far fewer levels; this only stops a live writer


def remove_tree(path: str) -> None:
    try:
        root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        _empty(root)
    finally:
        os.close(root)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _empty(root: int) -> None:
    prefix = f".removing-{secrets.token_hex(8)}-"  # no name the sample could have chosen in advance
    counter = itertools.count()
    for _ in range(_MAX_PASSES):
        try:
            os.chmod(root, 0o700)
            names = os.listdir(root)
        except OSError:
            return
        progress = [_remove_or_flatten(root, name, prefix, counter) for name in names]  # every entry, every pass
        if not any(progress):
            return


def _remove_or_flatten(root: int, name: str, prefix: str, counter) -> bool:
    """Remove one entry of the root; for a non-empty directory, move its children up instead. True on progress."""
    try:
        os.unlink(name, dir_fd=root)  # files, symlinks (never followed), fifos, sockets, device nodes
        return True
    except IsADirectoryError:
        pass
    except OSError:
        return False
    try:
        os.chmod(name, 0o700, dir_fd=root)
        directory = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    except OSError:
        return False
    try:
        children = os.listdir(directory)
        for child in children:
            os.rename(child, f"{prefix}{next(counter)}", src_dir_fd=directory, dst_dir_fd=root)
        if not children:
            os.rmdir(name, dir_fd=root)
        return True
    except OSError:
        return False
    finally:
        os.close(directory)
