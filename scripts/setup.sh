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

# bubblewrap builds the HumanEval sandbox's namespaces when present (docs/sandbox.md); without it the sandbox
# builds the same ones through the kernel. Installed only as root where apt exists, and never fatal.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  timeout 300 sh -c 'apt-get install -y -qq bubblewrap || { apt-get update -qq && apt-get install -y -qq bubblewrap; }' \
    >/dev/null 2>&1 || echo "setup: bubblewrap not installed; the HumanEval sandbox will use the kernel directly" >&2
fi
