#!/usr/bin/env bash
# Issue 17's GPU checks as one command: at most 9 1/2 minutes (the steps' time limits add up to 530 s, plus the
# wheel install), every step under its own timeout, everything logged as it goes to $OUT/log, results beside it
# (bench-*.json / bench-*.md, at most 10 files).
#
# Before, on the machine that has the checkout (downloads what the GPU machine lacks, ../shared/gpu/README.md;
# liger-kernel is the one extra wheel train.liger_kernel needs there):
#   GPU_EXTRA_WHEELS="liger-kernel==0.8.5" bash ../shared/gpu/prepare.sh
# (prepare.sh writes .git/info/exclude, which a `git worktree` checkout does not have as a folder: .whl/ and
# .gpu-data/ are in .gitignore, so there create the two folders by the same pip download and cp it runs.)
# Then on the GPU machine, from the project root, carrying .whl and .gpu-data:
#   bash scripts/gpu_check.sh
# Order of value: CUDA exactness of the fused path; one FSDP2 QLoRA process (issue 24: NCCL, bf16, sharded
# Params4bit); Llama-3.2-1B NF4 bench (every configuration, memory);
# Llama-3-8B NF4 bench; 1B with Liger kernels; 1B with torch.compile and with CUDA graphs.
# Without CUDA it says so and runs the same steps at CPU size (tiny models), as a dry run of the script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sharelora-gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .gpu-data ] && export SHARELORA_DATA=${SHARELORA_DATA:-$PWD/.gpu-data}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

step() {  # step NAME SECONDS COMMAND...: run, time and report one step; a failed step does not stop the rest
  local name=$1 seconds=$2; shift 2
  echo "=== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout "$seconds" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s"
}

fsdp2_qlora() {  # fsdp2_qlora COMPUTE_DTYPE PRECISION: one FSDP2 process (torchrun) over an NF4 tiny Llama, 10 steps
  local work=${TMPDIR:-/tmp}/sharelora-fsdp2-qlora-$1  # outside $OUT, which returns at most 10 files
  rm -rf "$work" && "$PY" scripts/make_tiny_model.py "$work/tiny-llama" >/dev/null || return 1
  cat >"$work/recipe.yaml" <<EOF
{"model": {"name_or_path": "$work/tiny-llama"}, "adapter": {"method": "sharea", "rank": 8},
 "data": {"max_length": 128, "overlength": "drop", "max_examples": 400},
 "quantization": {"load_in_4bit": true, "compute_dtype": "$1"},
 "train": {"max_steps": 10, "batch_size": 4, "report_to": [], "mixed_precision": "$2",
           "distributed": {"strategy": "fsdp2"}},
 "output_dir": "$work/run"}
EOF
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m sharelora_cli train "$work/recipe.yaml"
}

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, transformers, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "bitsandbytes", bitsandbytes.__version__)'
  step "exactness on CUDA" 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_cuda.py tests/test_low_rank_function.py
  step "FSDP2 QLoRA, 1 process (bf16)" 60 fsdp2_qlora bfloat16 bf16
  step "llama-3.2-1b-nf4" 120 "$PY" scripts/bench_train.py --preset llama-3.2-1b-nf4 --rounds 4 \
    --json "$OUT/bench-1b-nf4.json" --markdown "$OUT/bench-1b-nf4.md"
  step "llama3-8b-nf4" 140 "$PY" scripts/bench_train.py --preset llama3-8b-nf4 --rounds 3 \
    --json "$OUT/bench-8b-nf4.json" --markdown "$OUT/bench-8b-nf4.md"
  step "llama-3.2-1b-nf4 + Liger" 50 "$PY" scripts/bench_train.py --preset llama-3.2-1b-nf4 --rounds 4 --liger-kernel \
    --configs floor,peft-lora,lora,sharea --json "$OUT/bench-1b-nf4-liger.json" --markdown "$OUT/bench-1b-nf4-liger.md"
  step "llama-3.2-1b-nf4 compiled" 50 "$PY" scripts/bench_train.py --preset llama-3.2-1b-nf4 --rounds 3 --skip-memory \
    --compile default --configs floor,lora --markdown "$OUT/bench-1b-nf4-compile.md"
  step "llama-3.2-1b-nf4 CUDA graphs" 50 "$PY" scripts/bench_train.py --preset llama-3.2-1b-nf4 --rounds 3 --skip-memory \
    --compile reduce-overhead --configs floor,lora --markdown "$OUT/bench-1b-nf4-cudagraphs.md"
else
  echo "gpu_check: no CUDA device here; dry run of the same steps at CPU size (the CUDA tests skip)"
  step "exactness (CPU)" 600 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_cuda.py tests/test_low_rank_function.py
  step "smoke bench" 300 "$PY" scripts/bench_train.py --preset smoke --rounds 1 --steps 1 --warmup 1 --threads 1 \
    --json "$OUT/bench-smoke.json" --markdown "$OUT/bench-smoke.md"
  step "smoke-nf4 bench, no memory pass" 300 "$PY" scripts/bench_train.py --preset smoke-nf4 --rounds 1 --steps 1 \
    --warmup 1 --threads 1 --skip-memory --markdown "$OUT/bench-smoke-nf4.md"
  step "dispatches per module" 300 "$PY" scripts/profile_step.py --dispatches --threads 1 --json "$OUT/dispatches.json"
  step "FSDP2 QLoRA, 1 process (CPU, float32)" 300 fsdp2_qlora float32 "no"
  echo "gpu_check: Liger and CUDA-graph steps need CUDA; not run"
fi
echo "gpu_check: done; results in $OUT"
