#!/usr/bin/env bash
# FSDP2 (2 gloo processes, each decoder layer sharded, the adapter owned by the root) against one process,
# for every method: 10 steps on the same global batch; one line per method (scripts/fsdp_check.py).
# A few minutes on a CPU machine: the tiny Llama is built afresh (needs ../shared/data, or SHARELORA_DATA).
# Errors reach stderr; each run's progress lines go to a log beside it, and tqdm's bars are off.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
"$PY" scripts/fsdp_check.py "$@"
