"""remove_tree deletes whatever tree a sample leaves behind, never follows its links and never raises."""

import os

from sharelora_cli.evaluation.sandbox.cleanup import remove_tree


def _deep_chain(root, depth: int, mode: int) -> None:
    """root/d/d/.../d, depth levels, each made unreadable (mode) after its child exists; only descriptors,
    since the full path is far longer than PATH_MAX."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    for _ in range(depth):
        os.mkdir("d", dir_fd=fds[-1])
        fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        if len(fds) > 2:
            os.close(fds.pop(0))
    os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fds[-1]))
    for fd in fds:
        os.close(fd)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.chmod("d", mode, dir_fd=fd)  # the top one at least; permissions below matter once it is opened
    os.close(fd)


def test_a_tree_deeper_than_path_max_and_the_recursion_limit_is_removed(tmp_path):
    # 3000 levels: the path is 6000 characters (PATH_MAX is 4096), and a recursive walk exceeds Python's limit.
    tree = tmp_path / "tree"
    tree.mkdir()
    _deep_chain(tree, 3000, 0o000)
    remove_tree(str(tree))
    assert not tree.exists()


def test_unreadable_directories_fifos_and_links_out_are_removed_and_the_targets_kept(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("kept")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "file").write_text("x")
    os.mkfifo(tree / "a" / "fifo")
    (tree / "a" / "link").symlink_to(outside)
    (tree / "a" / "link_to_file").symlink_to(outside / "keep.txt")
    _deep_chain(tree, 50, 0o000)
    (tree / "a" / "b").chmod(0o000)
    (tree / "a").chmod(0o000)
    tree.chmod(0o000)
    remove_tree(str(tree))
    assert not tree.exists()
    assert (outside / "keep.txt").read_text() == "kept"


def test_a_missing_path_or_a_file_is_left_alone_without_raising(tmp_path):
    remove_tree(str(tmp_path / "absent"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    remove_tree(str(plain))
    assert plain.read_text() == "x"
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    remove_tree(str(link))  # a link is never followed, not even at the top
    assert plain.exists() and link.is_symlink()
