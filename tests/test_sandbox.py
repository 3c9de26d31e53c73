"""The sandbox under ordinary misbehaviour (guard on), in every isolation this machine offers, and its protocol."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from sandbox_support import STRONG, require, strong  # noqa: F401 (strong is a fixture)

from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.humaneval import load_problems, score_samples
from sharelora_cli.evaluation.sandbox.session import (
    RESULT_CHARS,
    Isolation,
    Limits,
    Outcome,
    SampleRaised,
    Sandbox,
    SandboxStopped,
    choose_isolation,
    run_program,
)

SECRET_NAME, SECRET_VALUE = "SHARELORA_TEST_SECRET", "hunter2-do-not-leak"
SHARELORA = Path(sys.executable).parent / "sharelora"


@pytest.fixture(params=list(Isolation), ids=lambda isolation: isolation.value)
def isolation(request) -> Isolation:
    return require(request.param)


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


def test_a_strong_sandbox_works_in_a_private_tmp_that_vanishes(strong):
    name = f"scratch-{os.getpid()}-{strong.value}"
    program = f"import os\nassert os.getcwd() == '/tmp' and os.listdir() == []\nopen({name!r}, 'w').write('x')\n"
    program += f"assert os.listdir('/tmp') == [{name!r}]"
    assert run_program(program, isolation=strong) == Outcome(True, "passed")
    assert not os.path.exists(os.path.join("/tmp", name))


def test_the_weak_sandbox_works_in_a_fresh_directory_it_removes_afterwards():
    outcome = run_program(
        "import os\nassert os.listdir() == []\nopen('scratch', 'w').write('x')\nraise RuntimeError(os.getcwd())",
        isolation=Isolation.WEAK,
    )
    workdir = re.fullmatch(r"failed: RuntimeError: (\S+)", outcome.result).group(1)
    assert workdir.startswith(os.path.join(tempfile.gettempdir(), "sharelora-sandbox-"))
    assert not os.path.exists(workdir)


def test_the_child_sees_a_minimal_environment_and_an_empty_stdin(isolation, monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    outcome = run_program(
        "import os, sys\nassert sys.stdin.read() == ''\nraise RuntimeError(sorted(os.environ))", isolation=isolation
    )
    names = set(re.findall(r"'(\w+)'", outcome.result))
    assert names == {"HOME", "LANG", "PATH", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}


def test_exiting_early_never_counts_as_passing(isolation):
    assert run_program("pass", isolation=isolation) == (True, "passed")
    assert run_program("import sys\nsys.exit(0)", isolation=isolation) == (False, "failed: SystemExit: 0")
    assert run_program("import os\nos._exit(0)", isolation=isolation) == (
        False,
        "failed: exited with code 0 before finishing",
    )


def test_memory_and_output_limits_are_configurable(isolation):
    small = Limits(memory_mb=256, max_output_bytes=4096)
    assert run_program("block = bytearray(400 * 1024 ** 2)", small, isolation).result == "failed: MemoryError"
    assert run_program("block = bytearray(100 * 1024 ** 2)", small, isolation).passed
    assert "File too large" in run_program("print('x' * 5000)", small, isolation).result
    assert run_program("print('x' * 3000)", small, isolation).passed


def test_the_scratch_space_is_capped_as_a_whole(strong):
    # Each file stays under the 1 MiB file-size limit; the tmpfs size (4 MiB here) caps their sum.
    program = "for i in range(100):\n    open(f'/tmp/f{i}', 'wb').write(b'x' * 1000000)"
    outcome = run_program(program, Limits(scratch_mb=4), strong)
    assert outcome.result == "failed: OSError: [Errno 28] No space left on device"


def test_files_outside_the_workdir_can_be_neither_written_nor_read(isolation, canary):
    planted = canary / "planted.txt"
    denied = {"PermissionError", "FileNotFoundError"}  # refused by the guard, or not there in the private /tmp
    assert _error_type(run_program(f"open({str(planted)!r}, 'w').write('x')", isolation=isolation).result) in denied
    leak = run_program(f"raise RuntimeError(open({str(canary / 'keep.txt')!r}).read())", isolation=isolation).result
    assert _error_type(leak) in denied and "still here" not in leak
    parent_environment = "import os\nopen(f'/proc/{os.getppid()}/environ').read()"
    assert _error_type(run_program(parent_environment, isolation=isolation).result) == "PermissionError"
    assert run_program(
        "import os\nassert 'def ' in open(os.__file__).read()", isolation=isolation
    ).passed  # the stdlib stays readable
    assert not planted.exists()


def test_no_thread_or_process_can_start_even_through_unaudited_calls(isolation):
    # _thread raises no audit event, so only RLIMIT_NPROC (the kernel) stops it.
    outcome = run_program("import _thread\n_thread.start_new_thread(print, ())", isolation=isolation)
    assert outcome.result == "failed: RuntimeError: can't start new thread"


def test_calls_return_plain_values_and_report_what_the_function_raised(isolation):
    source = (
        "calls = []\ndef f(x, *, scale=1):\n    calls.append(x)\n    return {'x': (x * scale, [x]), 'n': len(calls)}\n"
    )
    source += "def boom(x):\n    raise ValueError(f'bad {x}\\nsecond line')\n"
    with Sandbox(source, Limits(), isolation) as sandbox:
        assert sandbox.call("f", 2.5, scale=2) == {"x": (5.0, [2.5]), "n": 1}
        assert sandbox.function("f")(b"ab") == {"x": (b"ab", [b"ab"]), "n": 2}  # state persists between calls
        with pytest.raises(SampleRaised, match=r"^ValueError: bad 3$"):
            sandbox.call("boom", 3)
        with pytest.raises(SampleRaised, match="defines no function 'missing'"):
            sandbox.call("missing")
        assert sandbox.call("f", 0)["n"] == 3 and sandbox.stop_reason is None


def test_a_value_that_is_not_plain_data_is_a_failure_of_that_call(isolation):
    source = "class Yes:\n    def __eq__(self, other):\n        return True\ndef f():\n    return [1, Yes()]\n"
    with Sandbox(source, Limits(), isolation) as sandbox:
        with pytest.raises(SampleRaised, match="not plain data: a Yes value"):
            sandbox.call("f")


def test_a_slow_call_stops_the_sandbox_for_good(isolation):
    source = "import time\ndef nap(seconds):\n    time.sleep(seconds)\n    return seconds\n"
    with Sandbox(source, Limits(timeout=1.5), isolation) as sandbox:
        assert sandbox.call("nap", 0) == 0
        with pytest.raises(SandboxStopped, match="^timed out$"):
            sandbox.call("nap", 60)
        with pytest.raises(SandboxStopped, match="^timed out$"):
            sandbox.call("nap", 0)
        assert sandbox.stop_reason == "timed out"


def test_text_from_a_sample_reaches_results_as_one_short_line(isolation):
    huge = run_program("raise RuntimeError('y' * 10**6 + '\\nsecond line')", isolation=isolation)
    assert huge.result == "failed: RuntimeError: " + "y" * (RESULT_CHARS - len("RuntimeError: "))
    printed = run_program("import os\nprint('z' * 5000, flush=True)\nos._exit(3)", isolation=isolation)
    assert printed.result == "failed: exited with code 3 before finishing (" + "z" * RESULT_CHARS + ")"
    with Sandbox("def big():\n    return 'w' * (2 << 20)\n", Limits(), isolation) as sandbox:
        with pytest.raises(SandboxStopped, match=r"^failed: a reply of \d+ bytes exceeds the limit of 1048576$"):
            sandbox.call("big")


def test_choose_isolation_prefers_the_strongest_available():
    strongest = next((isolation for isolation in STRONG if _available(isolation)), None)
    if strongest is None:
        with pytest.raises(UserError, match="--allow-weak-sandbox"):
            choose_isolation(allow_weak=False)
        assert choose_isolation(allow_weak=True) is Isolation.WEAK
    else:
        assert choose_isolation(allow_weak=False) is choose_isolation(allow_weak=True) is strongest


def _available(isolation: Isolation) -> bool:
    try:
        require(isolation)
    except pytest.skip.Exception:
        return False
    return True


# A process that is uid 0 in a user namespace of its own but holds no capability there and cannot create
# user namespaces (max_user_namespaces = 0): neither root nor user namespaces, as in a locked-down container.
NO_NAMESPACES = [
    "unshare", "--user", "--map-root-user", "sh", "-c",
    "echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --bounding-set=-all --inh-caps=-all"
    ' --securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked -- "$@"', "sh",
]  # fmt: skip


def _without_namespaces_support() -> str | None:
    if not all(shutil.which(tool) for tool in ("unshare", "setpriv")):
        return "needs unshare and setpriv (util-linux)"
    probe = subprocess.run([*NO_NAMESPACES, "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot build the test's namespace-less process: {probe.stderr.strip()}"


def test_without_namespaces_the_cli_refuses_in_one_line_unless_the_weak_guard_is_accepted(tmp_path, problems):
    if reason := _without_namespaces_support():
        pytest.skip(reason)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        json.dumps({"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]}) + "\n"
    )
    results = tmp_path / "results.json"
    command = [
        *NO_NAMESPACES,
        str(SHARELORA),
        "eval",
        "--tasks",
        "humaneval",
        "--samples",
        str(samples),
        "--allow-code-execution",
    ]
    refused = subprocess.run([*command, "--json", str(results)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: the HumanEval sandbox cannot create Linux namespaces here"
    ), lines
    assert "--allow-weak-sandbox" in lines[0] and "Operation not permitted" in lines[0]
    assert not results.exists()
    accepted = subprocess.run(
        [*command, "--allow-weak-sandbox", "--json", str(results)], capture_output=True, text=True, timeout=300
    )
    assert accepted.returncode == 0, accepted.stderr
    document = json.loads(results.read_text())
    assert document["humaneval"]["pass@1"] == 1.0
    assert "humaneval sandbox: weak" in accepted.stdout.splitlines()
    assert document["config"]["settings"] == {"humaneval": {"sandbox": "weak"}}


def test_eval_help_documents_the_weak_sandbox_flag():
    wide = {**os.environ, "COLUMNS": "200"}
    shown = subprocess.run([str(SHARELORA), "eval", "--help"], capture_output=True, text=True, timeout=120, env=wide)
    assert "--allow-weak-sandbox" in shown.stdout


def test_both_launchers_work_with_the_interpreter_venv_and_data_under_tmp():
    # bwrap mounts a fresh tmpfs at /tmp, and the kernel launcher builds its root there: what lies under the host's
    # /tmp must still be bound in. The script stages a copy of the interpreter, a venv from it and the data there.
    for isolation in STRONG:
        require(isolation)
    script = Path(__file__).parents[1] / "scripts" / "humaneval_canonical.py"
    command = [sys.executable, str(script), "--under", "/tmp", "--limit", "3", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {row["launcher"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {"bwrap", "kernel"}
    for row in rows.values():
        assert (row["passed"], row["total"], row["failures"]) == (3, 3, []), row
        assert (
            row["interpreter"].startswith("/tmp/") and row["data"].startswith("/tmp/") and "/venv/" in row["evaluator"]
        )
