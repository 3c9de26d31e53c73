#!/usr/bin/env bash
# Set up the environment if needed, check lint, format and types (rules in pyproject.toml), then run the
# whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check sharelora_cli tests scripts
.venv/bin/ruff format --check sharelora_cli tests scripts
.venv/bin/mypy
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -n 2 --durations=20 "$@"
