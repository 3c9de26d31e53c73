#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install sharelora with its test tools.
# CPU machines get the pinned CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SHARELORA_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" torch==2.13.0
fi
"${pip[@]}" -e ".[dev]"
