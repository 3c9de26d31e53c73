"""Run the installed `sharelora` command in a subprocess, as a user would."""

import subprocess
import sys
from pathlib import Path

from sharelora_cli.core.paths import PROJECT_ROOT

SHARELORA = Path(sys.executable).parent / "sharelora"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SHARELORA), *args], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> str:
    """Exit code 2, a single `error: ...` line on stderr naming each of `named`, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in named:
        assert text in lines[0]
    return lines[0]
