"""Hostile programs are contained and scored as failures while benign ones in the same run still pass."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from sharelora_cli.evaluation import sandbox_child
from sharelora_cli.evaluation.humaneval import load_problems, score_samples
from sharelora_cli.evaluation.sandbox import Limits, run_program

SECRET_NAME, SECRET_VALUE = "SHARELORA_TEST_SECRET", "hunter2-do-not-leak"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch and network namespace need root")


@pytest.fixture(scope="module")
def problems(shared_data):
    return load_problems()


@pytest.fixture
def canary(tmp_path):
    """A directory outside every sandbox, with a file in it, that hostile programs try to destroy."""
    directory = tmp_path / "canary"
    directory.mkdir()
    (directory / "keep.txt").write_text("still here")
    return directory


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.3)
    yield server
    server.close()


def _nothing_connected(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except TimeoutError:
        return True
    connection.close()
    return False


def _error_type(result: str) -> str:
    """The exception name in "failed: Type: message", else the whole result ("passed", "timed out")."""
    match = re.match(r"failed: (\w+)", result)
    return match.group(1) if match else result


def _hostile(attack: str, body: str) -> str:
    """A completion that attacks first and then solves the task, so only containment makes it fail."""
    return textwrap.indent(textwrap.dedent(attack).strip() + "\n", "    ") + body


def test_hostile_completions_fail_while_benign_ones_pass(problems, canary, listener, monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    body = problems["HumanEval/0"]["canonical_solution"]
    port = listener.getsockname()[1]
    attacks = {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "10 GB allocation": "block = bytearray(10 * 1024 ** 3)",
        "rm -rf": f"import os\nos.system('rm -rf ' + {str(canary)!r})",
        "file deletion": f"import os\nos.remove({str(canary / 'keep.txt')!r})",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'leak')",
        "env secret": f"import os\nassert os.environ[{SECRET_NAME!r}] == {SECRET_VALUE!r}",
        "kill parent": "import os\nos.kill(os.getppid(), 9)",
        "huge stdout": "while True:\n    print('x' * 65536)",
        "early exit": "import os\nos._exit(0)",
    }
    samples = [{"task_id": "HumanEval/0", "completion": _hostile(attack, body)} for attack in attacks.values()]
    for task in ("HumanEval/0", "HumanEval/1"):
        samples.append({"task_id": task, "completion": problems[task]["canonical_solution"]})
    samples.append({"task_id": "HumanEval/2", "completion": "    return number\n"})

    scores = score_samples(problems, samples, ks=(1,), timeout=3.0, allow_code_execution=True)

    results = dict(zip([*attacks, "benign 0", "benign 1", "wrong 2"], (r["result"] for r in scores["records"])))
    assert results["infinite loop"] == "timed out"
    assert results["10 GB allocation"] == "failed: MemoryError"
    assert "File too large" in results["huge stdout"]
    assert all(results[name].startswith("failed: ") for name in attacks if name != "infinite loop")
    assert results["benign 0"] == results["benign 1"] == "passed"
    assert results["wrong 2"].startswith("failed: AssertionError")
    assert scores["pass@1"] == pytest.approx((1 / 11 + 1 + 0) / 3)
    assert (canary / "keep.txt").read_text() == "still here"
    assert _nothing_connected(listener)


def test_each_program_gets_a_fresh_workdir_that_is_removed_afterwards():
    outcome = run_program("import os\nassert os.listdir() == []\nopen('scratch', 'w').write('x')\nraise RuntimeError(os.getcwd())")
    workdir = re.fullmatch(r"failed: RuntimeError: (\S+)", outcome.result).group(1)
    assert workdir.startswith(os.path.join(tempfile.gettempdir(), "sharelora-sandbox-"))
    assert not os.path.exists(workdir)


def test_the_child_sees_a_minimal_environment_and_an_empty_stdin(monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    outcome = run_program("import os, sys\nassert sys.stdin.read() == ''\nraise RuntimeError(sorted(os.environ))")
    names = set(re.findall(r"'(\w+)'", outcome.result))
    assert names == {"HOME", "LANG", "PATH", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}


def test_exiting_early_never_counts_as_passing():
    assert run_program("pass") == (True, "passed")
    assert run_program("import sys\nsys.exit(0)") == (False, "failed: SystemExit: 0")
    assert run_program("import os\nos._exit(0)") == (False, "failed: exited with code 0 before finishing")


def test_memory_and_output_limits_are_configurable():
    assert run_program("block = bytearray(400 * 1024 ** 2)", Limits(memory_mb=256)).result == "failed: MemoryError"
    assert run_program("block = bytearray(100 * 1024 ** 2)", Limits(memory_mb=256)).passed
    assert "File too large" in run_program("print('x' * 5000)", Limits(max_output_bytes=4096)).result
    assert run_program("print('x' * 3000)", Limits(max_output_bytes=4096)).passed


def test_files_outside_the_workdir_can_be_neither_written_nor_read(canary):
    planted = canary / "planted.txt"
    assert _error_type(run_program(f"open({str(planted)!r}, 'w').write('x')").result) == "PermissionError"
    assert _error_type(run_program(f"open({str(canary / 'keep.txt')!r}).read()").result) == "PermissionError"
    parent_environment = "import os\nopen(f'/proc/{os.getppid()}/environ').read()"
    assert _error_type(run_program(parent_environment).result) == "PermissionError"
    assert run_program("import os\nassert 'def ' in open(os.__file__).read()").passed  # the stdlib stays readable
    assert not planted.exists()


def test_no_thread_or_process_can_start_even_through_unaudited_calls():
    # _thread raises no audit event, so only RLIMIT_NPROC (the kernel) stops it.
    outcome = run_program("import _thread\n_thread.start_new_thread(print, ())")
    assert outcome.result == "failed: RuntimeError: can't start new thread"


# Runs the child's kernel-level steps on their own, without the audit hook, then tries what the hook
# would otherwise refuse: only the network namespace, the nobody user and the rlimits stand in the way.
KERNEL_PROBE = """
import ctypes, json, os, runpy, socket, sys
child = runpy.run_path(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
child["_enter_private_network"](libc)
child["_become_nobody"](libc)
child["_set_limits"]({"cpu_seconds": 10, "memory_bytes": 1 << 30, "max_output_bytes": 1 << 20})
canary, port = sys.argv[2], int(sys.argv[3])

def attempt(action):
    try:
        action()
    except OSError as err:
        return type(err).__name__
    return "allowed"

def fork():
    if os.fork() == 0:
        os._exit(0)

print(json.dumps({
    "signal parent": attempt(lambda: os.kill(os.getppid(), 0)),  # same permission check as SIGKILL
    "fork": attempt(fork),
    "delete file": attempt(lambda: os.unlink(os.path.join(canary, "keep.txt"))),
    "write file": attempt(lambda: open(os.path.join(canary, "planted.txt"), "w").close()),
    "parent environ": attempt(lambda: open(f"/proc/{os.getppid()}/environ").read()),
    "connect": attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).sendall(b"leak")),
}))
"""


@as_root
def test_kernel_layers_hold_without_the_audit_hook(canary, listener):
    port = str(listener.getsockname()[1])
    command = [sys.executable, "-c", KERNEL_PROBE, sandbox_child.__file__, str(canary), port]
    probe = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir())
    assert json.loads(probe.stdout) == {
        "signal parent": "PermissionError",
        "fork": "BlockingIOError",
        "delete file": "PermissionError",
        "write file": "PermissionError",
        "parent environ": "PermissionError",
        "connect": "OSError",  # ENETUNREACH: the namespace's loopback is down
    }, probe.stderr
    assert sorted(path.name for path in canary.iterdir()) == ["keep.txt"]
    assert _nothing_connected(listener)
