"""Samples that first switch off the in-process guard, against what the kernel enforces (bubblewrap and the
kernel launcher): files, processes, signals, secrets, network, the run itself and the verdict.

Every attack starts with sandbox_support.DISABLE_GUARD, which also proves the guard is off (ctypes loads,
/proc/self/status opens). Each test runs once per strong isolation and is skipped, with the reason, where
this machine cannot provide it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from sandbox_support import DISABLE_GUARD, hostile, marker, processes_named, strong  # noqa: F401 (strong is a fixture)

from sharelora_cli.core.paths import PROJECT_ROOT, data_dir
from sharelora_cli.evaluation.humaneval import load_problems, score_samples
from sharelora_cli.evaluation.sandbox.plan import DEV_LINKS, DEVICES, WORKDIR, Plan, make_plan
from sharelora_cli.evaluation.sandbox.plan import interpreter as plan_interpreter
from sharelora_cli.evaluation.sandbox.session import NOBODY, Isolation, Limits, SampleRaised, Sandbox, SandboxStopped

SHARELORA = Path(sys.executable).parent / "sharelora"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="a root-only file and a victim owned by nobody need root")


@pytest.fixture(scope="module")
def problems(shared_data):
    return load_problems()


@pytest.fixture
def visible_dir():
    """A directory the sandbox sees (read-only): not under /tmp, a home directory or the data directory."""
    parent = "/var/tmp" if os.access("/var/tmp", os.W_OK) else str(PROJECT_ROOT)
    directory = tempfile.mkdtemp(prefix="sharelora-hostile-", dir=parent)
    os.chmod(directory, 0o755)
    yield Path(directory)
    shutil.rmtree(directory)


def _attack(source: str, isolation: Isolation, function: str = "attack", *args, limits: Limits = Limits(timeout=30)):
    """Run DISABLE_GUARD + source in a sandbox and return what source's function reports."""
    with Sandbox(DISABLE_GUARD + textwrap.dedent(source), limits, isolation) as sandbox:
        return sandbox.call(function, *args)


def _host_entries(name: str) -> list[str]:
    """Paths on the host, in the places a sample tries to write, whose name contains `name`."""
    places = ["/tmp", "/dev/shm", "/var/tmp", str(PROJECT_ROOT), str(Path.home()), "/"]
    return [
        os.path.join(place, entry)
        for place in places
        if os.path.isdir(place)
        for entry in os.listdir(place)
        if name in entry
    ]


def test_the_attacks_really_switch_the_guard_off(strong):
    # With the guard on, ctypes is refused; after DISABLE_GUARD it loads and calls into libc.
    with Sandbox("def pid():\n    import ctypes\n    return ctypes.CDLL(None).getpid()\n", Limits(), strong) as guarded:
        with pytest.raises(SampleRaised, match=r"^PermissionError: sandbox: ctypes\.dlopen is not allowed$"):
            guarded.call("pid")
    assert _attack("def attack():\n    return libc.getpid()\n", strong) == 2  # PID 2: init is 1, in its own namespace


def test_files_written_anywhere_stay_in_the_samples_tmpfs(strong):
    name = marker()
    report = _attack(
        f"""
        import errno, os, stat
        NAME = {name!r}
        def write(path, size=1):
            try:
                with open(path, "wb") as handle:
                    handle.write(b"x" * size)
                return "written"
            except OSError as err:
                return errno.errorcode[err.errno]
        def make(path, kind):
            try:
                os.mknod(path, 0o666 | kind, os.makedev(1, 3)) if kind == stat.S_IFCHR else os.mkfifo(path)
                return "made"
            except OSError as err:
                return errno.errorcode[err.errno]
        def attack():
            places = ["/tmp", "/dev/shm", os.getcwd(), "/var/tmp", {str(PROJECT_ROOT)!r}, "/", "/etc", "/dev", {str(Path.home())!r}]
            report = {{place: write(os.path.join(place, NAME)) for place in places}}
            report["filled"] = 0
            while report["filled"] < 100 and write(f"/tmp/{{NAME}}-{{report['filled']}}", (1 << 20) - 1) == "written":
                report["filled"] += 1
            for place in ("/tmp", "/var/tmp"):
                report["fifo " + place] = make(f"{{place}}/{{NAME}}-fifo", stat.S_IFIFO)
                report["device " + place] = make(f"{{place}}/{{NAME}}-null", stat.S_IFCHR)
            return report
        """,
        strong,
    )
    assert {place for place, outcome in report.items() if outcome == "written"} == {"/tmp"}, report
    assert 1 <= report["filled"] < 100 and report["filled"] * ((1 << 20) - 1) <= Limits().scratch_mb << 20
    assert report["fifo /tmp"] == "made" and report["fifo /var/tmp"] in {"EROFS", "EACCES", "ENOENT"}
    assert report["device /tmp"] == "EPERM" and report["device /var/tmp"] in {"EROFS", "EACCES", "EPERM", "ENOENT"}
    assert _host_entries(name) == []


def test_no_process_outlives_the_sample(strong):
    name = marker()
    source = f"""
        import errno, os, signal, threading, time
        def attack():
            libc.prctl(15, {name!r}.encode(), 0, 0, 0)  # PR_SET_NAME: how the test finds survivors
            report = {{"no death signal": libc.prctl(1, 0, 0, 0, 0)}}
            try:
                os.setsid()  # out of the process group the parent would kill
                report["setsid"] = "done"
            except OSError as err:
                report["setsid"] = errno.errorcode[err.errno]
            for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(number, signal.SIG_IGN)
            try:
                if os.fork() == 0:
                    os.execv("/bin/sleep", [{name!r}, "3600"])
                report["fork"] = "forked"
            except OSError as err:
                report["fork"] = errno.errorcode[err.errno]
            try:
                threading.Thread(target=time.sleep, args=(3600,)).start()
                report["thread"] = "started"
            except RuntimeError:
                report["thread"] = "refused"
            return report
        def linger():
            time.sleep(3600)
        """
    with Sandbox(DISABLE_GUARD + textwrap.dedent(source), Limits(timeout=5), strong) as sandbox:
        report = sandbox.call("attack")
        assert report.pop("setsid") in {"done", "EPERM"}  # EPERM: already leading its own group
        assert report == {"no death signal": 0, "fork": "EAGAIN", "thread": "refused"}
        assert processes_named(name) != []  # the test can see it while it runs
        with pytest.raises(SandboxStopped, match="^timed out$"):
            sandbox.call("linger")
    assert processes_named(name) == []


@as_root
def test_a_sample_can_signal_or_trace_nothing_outside_itself(strong):
    victim = subprocess.Popen(["sleep", "300"], user=NOBODY, group=NOBODY, extra_groups=[])  # same uid as the sample
    try:
        report = _attack(
            """
            import ctypes, errno, os
            def outcome(result):
                return "succeeded" if result == 0 else errno.errorcode[ctypes.get_errno()]
            def attack(victim, evaluator):
                visible = [pid for pid in range(1, 70000) if libc.kill(pid, 0) == 0 or ctypes.get_errno() == errno.EPERM]
                report = {"visible": visible, "me": os.getpid(), "parent": os.getppid()}
                for name, pid in (("victim", victim), ("evaluator", evaluator), ("init", 1)):
                    report[name] = outcome(libc.kill(pid, 9))
                report["pidfd victim"] = outcome(libc.syscall(434, victim, 0))  # pidfd_open
                report["everyone"] = outcome(libc.kill(-1, 9))
                report["ptrace init"] = outcome(libc.ptrace(16, 1, 0, 0))  # PTRACE_ATTACH
                report["init's capabilities"] = next(line.split()[1] for line in open("/proc/1/status") if line.startswith("CapEff"))
                return report
            """,
            strong,
            "attack",
            victim.pid,
            os.getpid(),
        )
        assert report == {
            "visible": [1, 2], "me": 2, "parent": 1,  # its own PID namespace: only init and itself
            "victim": "ESRCH", "evaluator": "ESRCH", "init": "EPERM", "pidfd victim": "ESRCH", "everyone": "ESRCH",
            "ptrace init": "EPERM", "init's capabilities": "0" * 16,  # init keeps no privilege a sample could borrow
        }  # fmt: skip
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_concurrent_killers_leave_every_other_sample_scored_as_when_alone(strong, problems):
    killer = """
        import os
        for pid in range(1, 70000):
            if pid != os.getpid():
                libc.kill(pid, 9)
        libc.kill(-1, 9)
        """
    benign = [
        {"task_id": task, "completion": problems[task]["canonical_solution"]}
        for task in ("HumanEval/1", "HumanEval/2", "HumanEval/3", "HumanEval/4")
    ]
    benign += [{"task_id": "HumanEval/5", "completion": "    return numbers\n"}]
    killers = [
        {"task_id": "HumanEval/0", "completion": hostile(problems["HumanEval/0"]["canonical_solution"], killer)}
    ] * 3
    alone = score_samples(problems, benign, ks=(1,), timeout=30, workers=1, allow_code_execution=True, isolation=strong)
    mixed = score_samples(
        problems, killers + benign, ks=(1,), timeout=30, workers=4, allow_code_execution=True, isolation=strong
    )
    assert mixed["records"][3:] == alone["records"]
    assert [record["result"] for record in alone["records"]] == ["passed"] * 4 + ["failed: AssertionError"]
    assert [record["result"] for record in mixed["records"][:3]] == [
        "passed"
    ] * 3  # correct code; its kills hit nothing


def _allowlist(plan: Plan) -> set[str]:
    """Every path the plan makes visible, as the host has it: what docs/sandbox.md lists."""
    visible = {"/dev", "/proc", WORKDIR, *plan.directories, *plan.binds}
    visible |= {path for path, _ in plan.symlinks} | {f"/dev/{name}" for name in (*DEVICES, *DEV_LINKS)}
    for bound in plan.binds:
        for directory, directories, files in os.walk(bound):
            if directory in plan.covers:
                directories[:] = []  # shown empty
                continue
            visible |= {os.path.join(directory, name) for name in directories + files}
    return visible


def _canaries(tmp_root: Path) -> list[Path]:
    """World-readable files where a real machine keeps things, and a second copy of the benchmark."""
    places = [
        Path("/tmp"), Path("/var/tmp"), PROJECT_ROOT.parent, PROJECT_ROOT, Path.home(), Path("/opt"), Path("/srv"),
        Path(sys.prefix), Path(plan_interpreter()).parent.parent, data_dir(),
    ]  # fmt: skip
    canaries = []
    for place in places:
        place.mkdir(parents=True, exist_ok=True)
        canary = place / f"{tmp_root.name}-canary.txt"
        canary.write_text("canary")
        canary.chmod(0o644)
        canaries.append(canary)
    copy = Path("/var/tmp") / f"{tmp_root.name}-HumanEval.jsonl.gz"
    shutil.copy(data_dir() / "humaneval" / "HumanEval.jsonl.gz", copy)
    copy.chmod(0o644)
    return [*canaries, copy, data_dir() / "humaneval" / "HumanEval.jsonl.gz"]


def test_the_sample_sees_exactly_the_allowlist_and_no_canary(strong, tmp_path):
    canaries = _canaries(tmp_path)
    source = """
        import errno, os
        def attack(canaries):
            seen = set()
            for directory, directories, files in os.walk("/"):
                if directory in ("/proc", "/tmp"):
                    directories[:] = []  # its own processes; its own scratch space
                    continue
                seen |= {os.path.join(directory, name) for name in directories + files}
            report = {}
            for path in canaries:
                try:
                    with open(path, "rb") as handle:
                        report[path] = handle.read(8).decode("latin-1")
                except OSError as err:
                    report[path] = errno.errorcode[err.errno]
            return sorted(seen | {"/"}), report
        """
    try:
        with Sandbox(
            DISABLE_GUARD + textwrap.dedent(source), Limits(timeout=60, max_output_bytes=16 << 20), strong
        ) as box:
            seen, report = box.call("attack", [str(canary) for canary in canaries])
    finally:
        for canary in canaries[:-1]:
            canary.unlink()
    expected = _allowlist(make_plan(Limits().scratch_mb << 20)) | {"/"}
    assert sorted(set(seen) - expected) == [] and sorted(expected - set(seen)) == []
    assert report == {str(canary): "ENOENT" for canary in canaries}
    assert not any(path.startswith((str(PROJECT_ROOT), str(data_dir()))) for path in seen)


def test_the_read_only_view_cannot_be_lifted_from_a_new_user_namespace(strong):
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    report = _attack(
        f"""
        import ctypes, errno, os
        def outcome(result):
            return "succeeded" if result == 0 else errno.errorcode[ctypes.get_errno()]
        def attack():
            # As nobody it may still create a user namespace (if the host allows them) and, inside, hold every
            # capability over a new mount namespace; the kernel locks the mounts it inherited, though.
            report = {{"unshare": outcome(libc.unshare(0x10000000 | 0x20000))}}
            for target in ({stdlib!r}, "/"):  # MS_REMOUNT | MS_BIND without MS_RDONLY: make it writable
                report["remount " + target] = outcome(libc.mount(None, target.encode(), None, 0x20 | 0x1000, None))
                report["unmount " + target] = outcome(libc.umount2(target.encode(), 2))
            try:
                open(os.path.join({stdlib!r}, "planted.py"), "w").close()
                report["write"] = "written"
            except OSError as err:
                report["write"] = errno.errorcode[err.errno]
            return report
        """,
        strong,
    )
    assert report["write"] in {"EROFS", "EACCES"}, report
    assert "succeeded" not in {value for key, value in report.items() if key != "unshare"}, report
    assert not os.path.exists(os.path.join(stdlib, "planted.py"))


def test_the_network_and_host_sockets_are_unreachable(strong):
    server = socket.create_server(("127.0.0.1", 0))
    abstract, name = socket.socket(socket.AF_UNIX), marker()
    abstract.bind(f"\0{name}")
    abstract.listen()
    server.settimeout(0.2)
    abstract.settimeout(0.2)
    try:
        report = _attack(
            """
            import errno, socket
            def connect(family, address):
                try:
                    with socket.socket(family) as client:
                        client.settimeout(2)
                        client.connect(address)
                        client.sendall(b"leak")
                    return "connected"
                except OSError as err:
                    return errno.errorcode.get(err.errno, type(err).__name__)
            def attack(port, name):
                return {"tcp": connect(socket.AF_INET, ("127.0.0.1", port)), "abstract": connect(socket.AF_UNIX, "\\0" + name)}
            """,
            strong,
            "attack",
            server.getsockname()[1],
            name,
        )
        # The sample's own network namespace: bwrap brings its loopback up (nothing listens), the launcher leaves it down.
        assert report["tcp"] in {"ECONNREFUSED", "ENETUNREACH"} and report["abstract"] == "ECONNREFUSED"
        for listener in (server, abstract):
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        server.close()
        abstract.close()


def test_the_process_holds_no_privilege(strong):
    report = _attack(
        """
        import os
        def attack():
            status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
            try:
                os.setuid(0)
                regained = "root again"
            except PermissionError:
                regained = "refused"
            return {key: status[key].strip() for key in ("CapInh", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs")} | {
                "uid": os.getuid(), "setuid(0)": regained}
        """,
        strong,
    )
    expected_uid = NOBODY if os.geteuid() == 0 else os.getuid()
    zero = "0" * 16
    assert report == {
        "CapInh": zero,
        "CapPrm": zero,
        "CapEff": zero,
        "CapAmb": zero,
        "NoNewPrivs": "1",
        "uid": expected_uid,
        "setuid(0)": "refused",
    }


_UNPRIVILEGED_ATTACK = """
import errno, os
def attack(data_file):
    def attempt(action):
        try:
            action()
            return "succeeded"
        except OSError as err:
            return errno.errorcode[err.errno]
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {
        "uid": os.getuid(), "visible": sorted(int(pid) for pid in os.listdir("/proc") if pid.isdigit()),
        "CapEff": status["CapEff"].strip(), "NoNewPrivs": status["NoNewPrivs"].strip(),
        "read data": attempt(lambda: open(data_file, "rb").close()),
        "write /tmp": attempt(lambda: open("/tmp/x", "w").close()),
        "write /var/tmp": attempt(lambda: open("/var/tmp/sharelora-unprivileged-probe", "w").close()),
    }
"""
_UNPRIVILEGED_EVALUATOR = """
import json, sys
from sharelora_cli.evaluation.sandbox.session import Isolation, Sandbox, isolation_problem
isolation, source, data_file = Isolation(sys.argv[1]), sys.argv[2], sys.argv[3]
with Sandbox(source, isolation=isolation) as sandbox:
    print(json.dumps({"problem": isolation_problem(isolation), "report": sandbox.call("attack", data_file)}))
"""


def test_without_root_the_sandbox_holds_through_a_user_namespace(strong):
    # util-linux's unshare starts the evaluator as uid 1000 in a user namespace of its own, without capabilities:
    # bwrap and the kernel launcher then need the user namespace that root does without.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and util-linux's unshare to start an unprivileged evaluator")
    source = DISABLE_GUARD + textwrap.dedent(_UNPRIVILEGED_ATTACK)
    data_file = str(data_dir() / "humaneval" / "HumanEval.jsonl.gz")
    command = [
        "unshare",
        "--user",
        "--map-user=1000",
        "--map-group=1000",
        sys.executable,
        "-c",
        _UNPRIVILEGED_EVALUATOR,
    ]
    done = subprocess.run([*command, strong.value, source, data_file], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["problem"] is None
    assert result["report"] == {
        "uid": 1000, "visible": [1, 2], "CapEff": "0" * 16, "NoNewPrivs": "1",
        "read data": "ENOENT", "write /tmp": "succeeded", "write /var/tmp": "ENOENT",
    }  # fmt: skip


def test_verdicts_cannot_be_forged_from_inside(strong, problems):
    """Each completion below is wrong, but would pass where the tests share the candidate's interpreter."""
    walk_to_the_channel = """
        import sys
        from sandbox_wire import encode, send
        frame = sys._getframe()
        while frame and "replies" not in frame.f_locals:
            frame = frame.f_back
        channel = frame.f_locals["replies"]
        send(channel, encode(("ready",)))
        for _ in range(1000):
            send(channel, encode(("returned", False)))
        """
    data_file = str(data_dir() / "humaneval" / "HumanEval.jsonl.gz")
    forgeries = {
        "early exit": ("HumanEval/0", "    return True\nimport os\nos._exit(0)\n"),
        "frame walk to the reply channel": ("HumanEval/0", "    return True\n" + DISABLE_GUARD + textwrap.dedent(walk_to_the_channel)),
        "always-equal object": ("HumanEval/0", "    class Yes:\n        __eq__ = lambda self, other: True\n    return Yes()\n"),
        "always-equal str subclass": (
            "HumanEval/27", "    class S(str):\n        __eq__ = lambda self, other: True\n        __hash__ = str.__hash__\n    return S('?')\n"
        ),
        "redefined test helper": ("HumanEval/32", "    return 0.0\ndef poly(xs, x):\n    return 0.0\n"),
        "patched abs": ("HumanEval/2", "    return 0.5\nimport builtins\nbuiltins.abs = lambda x: 0\n"),
        "canonical solution from the data file": ("HumanEval/2", hostile(textwrap.indent(textwrap.dedent(f"""
            import gzip, json
            rows = [json.loads(line) for line in gzip.open({data_file!r}, "rt")]
            row = next(row for row in rows if row["task_id"] == "HumanEval/2")
            scope = {{}}
            exec(row["prompt"] + row["canonical_solution"], scope)
            return scope[row["entry_point"]](number)
            """), "    "), "")),
    }  # fmt: skip
    samples = [{"task_id": task, "completion": completion} for task, completion in forgeries.values()]
    samples += [
        {"task_id": task, "completion": problems[task]["canonical_solution"]}
        for task in ("HumanEval/0", "HumanEval/27", "HumanEval/32", "HumanEval/2")
    ]
    scores = score_samples(
        problems, samples, ks=(1,), timeout=30, workers=2, allow_code_execution=True, isolation=strong
    )
    results = dict(
        zip(
            [*forgeries, "canonical 0", "canonical 27", "canonical 32", "canonical 2"],
            (r["result"] for r in scores["records"]),
        )
    )
    assert results["early exit"] == "failed: exited with code 0 before finishing"
    assert results["always-equal object"] == "failed: WireError: not plain data: a Yes value"
    assert results["canonical solution from the data file"].startswith("failed: FileNotFoundError")
    assert all(results[name].startswith("failed: ") for name in forgeries), results
    assert all(results[f"canonical {task}"] == "passed" for task in (0, 27, 32, 2)), results


def test_hostile_replies_fail_only_their_own_sample(strong, problems):
    raw_reply = """
        import os, sys
        frame = sys._getframe()
        while frame and "replies" not in frame.f_locals:
            frame = frame.f_back
        os.write(frame.f_locals["replies"], PAYLOAD)
        os._exit(0)
        """
    frame = lambda body: len(body).to_bytes(4, "big") + body  # noqa: E731
    payloads = {
        "4 GiB announced": b"\xff\xff\xff\xff",
        "nested past the recursion limit": frame(b"[" * 300_000 + b"]" * 300_000),
        "not JSON": frame(b"\xff\xfe\x00\x01"),
        "an unknown tag": frame(b'{"code": "print(1)"}'),
    }
    samples = [
        {
            "task_id": "HumanEval/0",
            "completion": "    return True\n" + DISABLE_GUARD + f"PAYLOAD = {payload!r}\n" + textwrap.dedent(raw_reply),
        }
        for payload in payloads.values()
    ]
    samples.append({"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]})
    scores = score_samples(
        problems, samples, ks=(1,), timeout=30, workers=2, allow_code_execution=True, isolation=strong
    )
    results = [record["result"] for record in scores["records"]]
    assert results[0] == "failed: a reply of 4294967295 bytes exceeds the limit of 1048576"
    assert all(result.startswith("failed: ") and len(result) <= 320 for result in results[:4]), results
    assert results[4] == "passed"


def _deep_tree_completion(body: str) -> str:
    """A correct solution that first builds a 3000-deep directory tree in its working directory, chmod 000."""
    return hostile(
        body,
        """
        import os
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
        os.chmod("d", 0)
        """,
    )


def test_a_3000_deep_tree_cannot_stop_the_cli_from_writing_its_json(problems, tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = [
        {"task_id": "HumanEval/0", "completion": _deep_tree_completion(problems["HumanEval/0"]["canonical_solution"])},
        {"task_id": "HumanEval/1", "completion": problems["HumanEval/1"]["canonical_solution"]},
        {"task_id": "HumanEval/2", "completion": "    return number\n"},
    ]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = tmp_path / "results.json"
    done = subprocess.run(
        [str(SHARELORA), "eval", "--tasks", "humaneval", "--samples", str(samples), "--allow-code-execution", "--allow-weak-sandbox", "--json", str(results)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = json.loads(results.read_text())["records"]["humaneval"]
    assert [(record["task_id"], record["passed"]) for record in records] == [
        ("HumanEval/0", True),
        ("HumanEval/1", True),
        ("HumanEval/2", False),
    ]
    assert not Path(f"{results}.humaneval-progress.jsonl").exists()


def test_the_weak_sandbox_removes_a_3000_deep_unreadable_tree(problems, monkeypatch):
    scratch = tempfile.mkdtemp(prefix="sharelora-weak-")
    os.chmod(scratch, 0o755)  # nobody must reach its working directory inside
    monkeypatch.setattr(tempfile, "tempdir", scratch)
    try:
        sample = {
            "task_id": "HumanEval/0",
            "completion": _deep_tree_completion(problems["HumanEval/0"]["canonical_solution"]),
        }
        scores = score_samples(
            problems, [sample], ks=(1,), timeout=60, allow_code_execution=True, isolation=Isolation.WEAK
        )
        assert scores["records"][0]["result"] == "passed"
        assert os.listdir(scratch) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_EVALUATOR = """
import json, pathlib, sys
from sharelora_cli.evaluation.humaneval import load_problems, score_samples
from sharelora_cli.evaluation.sandbox.session import Isolation
samples, isolation, progress = json.loads(sys.argv[1]), Isolation(sys.argv[2]), pathlib.Path(sys.argv[3])
score_samples(load_problems(), samples, ks=(1,), timeout=3600, workers=2, allow_code_execution=True, isolation=isolation, progress_file=progress)
"""


def _wait_for(condition, seconds: float = 120.0) -> None:
    """Poll until condition() holds; a bound for a loaded machine, not a timing assertion."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.1)


def test_killing_the_evaluator_keeps_the_finished_records_and_leaves_no_process(strong, problems, tmp_path):
    name, progress = marker(), tmp_path / "progress.jsonl"
    lingering = hostile(
        "    return True\n", f"libc.prctl(15, {name!r}.encode(), 0, 0, 0)\nimport time\ntime.sleep(3600)\n"
    )
    samples = [{"task_id": "HumanEval/0", "completion": lingering}]
    samples += [
        {"task_id": task, "completion": problems[task]["canonical_solution"]} for task in ("HumanEval/1", "HumanEval/2")
    ]
    evaluator = subprocess.Popen(
        [sys.executable, "-c", _EVALUATOR, json.dumps(samples), strong.value, str(progress)], cwd=PROJECT_ROOT
    )
    try:
        _wait_for(lambda: progress.exists() and len(progress.read_text().splitlines()) == 2 and processes_named(name))
    finally:
        evaluator.kill()
        evaluator.wait()
    _wait_for(lambda: not processes_named(name), seconds=30)  # the launcher and bwrap die with their parent
    logged = sorted(
        (json.loads(line) for line in progress.read_text().splitlines()), key=lambda record: record["task_id"]
    )
    assert [(record["task_id"], record["result"]) for record in logged] == [
        ("HumanEval/1", "passed"),
        ("HumanEval/2", "passed"),
    ]


def test_a_hash_flooding_reply_fails_alone_and_stalls_no_other_sample(strong, problems):
    # A set subclass whose iterator yields 40k ints that all hash to 0: under 1 MiB on the wire, and n^2
    # comparisons (15 s, holding the GIL) were it rebuilt as a set by the evaluator.
    flood = """    class Flood(set):
        def __iter__(self):
            return iter([k * (2**61 - 1) for k in range(1, 40_000)])
    return Flood()
"""
    canonical = [
        {"task_id": task, "completion": problems[task]["canonical_solution"]}
        for task in ("HumanEval/1", "HumanEval/2", "HumanEval/3", "HumanEval/4")
    ]
    floods = [{"task_id": "HumanEval/0", "completion": flood}] * 2
    samples = [floods[0], *canonical[:2], floods[1], *canonical[2:]]
    scores = score_samples(
        problems, samples, ks=(1,), timeout=5, workers=2, allow_code_execution=True, isolation=strong
    )
    results = [record["result"] for record in scores["records"]]
    refused = "failed: the sample's reply is not plain data: a set or dict with more than 8 members of one hash value"
    assert results == [refused, "passed", "passed", refused, "passed", "passed"]
