#!/usr/bin/env bash
# Regenerate requirements/constraints.txt, the exact version of every direct and transitive dependency
# (all extras) that scripts/setup.sh installs: for Python >= 3.10 on any platform (uv's universal
# resolution), resolved together with requirements/torch-cpu.txt and leaving torch itself out, so that
# CPU machines take that pin and CUDA machines keep a CUDA build. Needs uv (`pip install uv`) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
"${UV:-uv}" pip compile pyproject.toml --all-extras --universal --python-version 3.10 \
  --constraint requirements/torch-cpu.txt --no-emit-package torch \
  --custom-compile-command "bash scripts/lock.sh" --output-file requirements/constraints.txt
