#!/usr/bin/env bash
# Set up the environment, build the tiny offline model, and train the quickstart recipe end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f artifacts/tiny-llama/config.json ] || .venv/bin/python scripts/make_tiny_model.py artifacts/tiny-llama
exec .venv/bin/sharelora train recipes/quickstart.yaml "$@"
