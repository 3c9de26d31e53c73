#!/usr/bin/env bash
# Set up the environment, build (or reuse) the tiny pretrained base, then show ShareA learning a held-back skill:
# score the held-out word problems, train recipes/quickstart.yaml, score them again.
# Extra arguments are recipe overrides for both training and evaluation (e.g. adapter.method=lora).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One intra-op thread: with the 2 cores shared with other work, two threads made a step of this small model
# 4-8x slower than one (they wait on each other). On an idle machine, OMP_NUM_THREADS=2 may be faster.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
started=$SECONDS
# pretraining.json is written last, so its presence means a finished base.
[ -f artifacts/tiny-llama-arith/pretraining.json ] && [ -f artifacts/synthetic-tasks/story/test.jsonl ] ||
  .venv/bin/python scripts/make_tiny_model.py --pretrain artifacts/tiny-llama-arith --tasks artifacts/synthetic-tasks
run=runs/quickstart-$(date +%Y%m%d-%H%M%S)
.venv/bin/sharelora eval recipes/quickstart.yaml "output_dir=$run" "$@" --no-adapter --json "$run/eval-before.json"
.venv/bin/sharelora train recipes/quickstart.yaml "output_dir=$run" "$@"
.venv/bin/sharelora eval recipes/quickstart.yaml "output_dir=$run" "$@" --json "$run/eval-after.json"
echo "quickstart: run in $run, $((SECONDS - started)) s after set-up"
.venv/bin/python - "$run/eval-before.json" "$run/eval-after.json" <<'EOF'
import json
import sys

METRIC = "strict-match"  # the number after "#### " equals the reference's, as lm-eval scores it
before, after = (json.load(open(path))["gsm8k"] for path in sys.argv[1:])
print(f"quickstart: accuracy {100 * before[METRIC]:.1f}% -> {100 * after[METRIC]:.1f}% on {after['num_samples']} held-out problems")
EOF
