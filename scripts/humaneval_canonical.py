"""HumanEval's canonical solutions through each strong sandbox, with the interpreter, a venv and the data staged
under a chosen folder (e.g. /tmp, which bubblewrap covers with its own tmpfs, or /var/tmp).

For each --under DIR: copies this interpreter (its binary and standard library, without tests or site-packages)
to DIR/python, makes DIR/venv from that copy, copies the HumanEval data to DIR/data; then, for each launcher,
runs the evaluator from DIR/venv (this checkout and this venv's packages on PYTHONPATH, SHARELORA_DATA=DIR/data)
on the canonical solutions, and prints one row per (folder, launcher). Results go to docs/sandbox.md by hand.

    .venv/bin/python scripts/humaneval_canonical.py --under /tmp --under /var/tmp [--limit N] [--json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sharelora_cli.core.paths import PROJECT_ROOT, data_dir

# __pycache__ stays: the child runs with -B, and would otherwise recompile every module it imports, every sample.
_LEFT_OUT = shutil.ignore_patterns("test", "site-packages", "config-*", "idlelib", "tkinter")


def stage(under: Path) -> tuple[Path, Path]:
    """A copy of this interpreter, a venv made from it and the HumanEval data, in a fresh folder under `under`."""
    root = Path(tempfile.mkdtemp(prefix="sharelora-canonical-", dir=under))
    os.chmod(root, 0o755)
    stdlib = Path(os.path.dirname(os.__file__)).resolve()
    python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    prefix = root / "python"
    shutil.copytree(stdlib, prefix / "lib" / stdlib.name, ignore=_LEFT_OUT)
    (prefix / "bin").mkdir(parents=True)
    shutil.copy2(python, prefix / "bin" / python.name)
    subprocess.run([prefix / "bin" / python.name, "-m", "venv", "--without-pip", root / "venv"], check=True)
    (root / "data" / "humaneval").mkdir(parents=True)
    shutil.copy(data_dir() / "humaneval" / "HumanEval.jsonl.gz", root / "data" / "humaneval")
    return root, root / "venv" / "bin" / "python"


def run_from(root: Path, venv_python: Path, launcher: str, limit: int | None, timeout: float) -> dict:
    """This script's --score, run by the staged venv; its JSON line."""
    site_packages = [path for path in sys.path if path.endswith("site-packages")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *site_packages]),
        "SHARELORA_DATA": str(root / "data"),
    }
    command = [str(venv_python), __file__, "--score", launcher, "--timeout", str(timeout)]
    command += ["--limit", str(limit)] if limit else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the evaluator under {root} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(launcher: str, limit: int | None, timeout: float) -> dict:
    """In the staged venv: the canonical solutions through one launcher."""
    from sharelora_cli.evaluation.humaneval import load_problems, score_samples
    from sharelora_cli.evaluation.sandbox.plan import interpreter
    from sharelora_cli.evaluation.sandbox.session import Isolation

    problems = dict(list(load_problems().items())[:limit])
    samples = [{"task_id": task, "completion": problem["canonical_solution"]} for task, problem in problems.items()]
    started = time.perf_counter()
    scores = score_samples(
        problems, samples, ks=(1,), timeout=timeout, allow_code_execution=True, isolation=Isolation(launcher)
    )
    failures = [f"{record['task_id']}: {record['result']}" for record in scores["records"] if not record["passed"]]
    return {
        "launcher": launcher,
        "evaluator": sys.executable,
        "interpreter": interpreter(),
        "data": str(data_dir()),
        "passed": len(samples) - len(failures),
        "total": len(samples),
        "seconds": round(time.perf_counter() - started, 1),
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--under", action="append", type=Path, help="folder to stage under (repeatable)")
    parser.add_argument("--launchers", default="bwrap,kernel")
    parser.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per sample; generous for a loaded machine")
    parser.add_argument("--json", action="store_true", help="one JSON row per line instead of a table")
    parser.add_argument("--score", help=argparse.SUPPRESS)  # internal: run inside the staged venv
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score(args.score, args.limit, args.timeout)))
        return
    rows = []
    for under in args.under or [Path(tempfile.gettempdir())]:
        root, venv_python = stage(under)
        try:
            rows += [{"under": str(under), **run_from(root, venv_python, launcher, args.limit, args.timeout)}
                     for launcher in args.launchers.split(",")]  # fmt: skip
        finally:
            shutil.rmtree(root)
    for row in rows:
        print(json.dumps(row) if args.json else _table_row(row))


def _table_row(row: dict) -> str:
    return (
        f"| {row['under']} | {row['launcher']} | {row['passed']}/{row['total']} | {row['seconds']} s"
        f" | {row['interpreter']} |"
    )


if __name__ == "__main__":
    main()
