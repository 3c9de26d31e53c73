"""One run at a time per output_dir: a lock file holding the owner's process id and host.

Two runs writing one output_dir would interleave checkpoints and overwrite each other's adapter. The
lock is created with O_EXCL, so of two runs started together exactly one gets it; the other stops in
one line. The file is written beside it and hard-linked into place, so it is never seen half-written.
A lock left by a process that died (killed, machine crash) is recovered when its process no
longer exists on this host; a lock from another host (a shared file system) cannot be checked, so the
message says to remove it by hand.
"""

import os
import socket
from pathlib import Path

from sharelora_cli.core.errors import UserError

LOCK_FILE = ".sharelora.lock"


class RunLock:
    """The lock on one output_dir, taken by the main process (acquire) and released when the run ends."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        draft = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        draft.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            # Twice at most: once more after removing a stale lock.
            for _ in range(2):
                try:
                    os.link(draft, self.path)  # fails if the lock exists: atomic, unlike a check then a write
                except FileExistsError:
                    self._remove_if_stale()
                    continue
                self.held = True
                return
        finally:
            draft.unlink()
        raise UserError(f"could not lock output_dir {self.path.parent}: {self.path} keeps reappearing; retry")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _remove_if_stale(self) -> None:
        try:
            pid_text, host = self.path.read_text().split()
            pid = int(pid_text)
        except FileNotFoundError:
            return  # released meanwhile
        except ValueError:
            pid, host = -1, socket.gethostname()  # not a lock this code wrote
        if host != socket.gethostname():
            raise UserError(
                f"output_dir {self.path.parent} is in use by a run on {host} (lock file {self.path}); "
                "wait for it, choose another output_dir, or delete the lock file if no run uses it"
            )
        if pid > 0 and process_exists(pid):
            raise UserError(
                f"output_dir {self.path.parent} is in use by process {pid} (lock file {self.path}); "
                "wait for it to finish or choose another output_dir"
            )
        self.path.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
