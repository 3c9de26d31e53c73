"""Peak memory of `sharelora merge` (full-precision and 4-bit paths) at two model sizes, against its bound.

For each size, builds a random-weight Llama (fp32, saved in 100 MB shards) and a random rank-16 LoRA on all
seven projections (non-zero B, so every target gets a ΔW), then runs `sharelora merge --max-shard-size
100MB` in a fresh child process, once on the full-precision path and once with the adapter marked as
trained on a 4-bit base (NF4, double quantisation, bf16 compute). The child reads its own VmHWM
(/proc/self/status: the process's peak resident memory) after the imports and again after the merge, so
"above imports" is the merge's own peak. The bound it is checked against: one output shard + the largest
tensor (float32, as read) + the adapter file, and on the 4-bit path the largest tensor once more in the
compute dtype (the cast that loading does, held in the shard); what is left is the fixed overhead, which
should not grow with the model.

    .venv/bin/python scripts/bench_merge_memory.py [--sizes small,medium] [--workdir DIR] [--json OUT]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sharelora_cli.adapters.adapter_io import save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, QuantizationConfig

SHARD = "100MB"
SHARD_BYTES = 100 * 10**6
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama shapes (32k vocabulary, untied head): ~58M and ~220M parameters.
SIZES = {
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
    "medium": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16},
}
FOUR_BIT = QuantizationConfig(load_in_4bit=True, compute_dtype="bfloat16")
# Runs in the child: the peak after the imports, then the merge through the CLI, then the peak again.
CHILD = """
import json, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from sharelora_cli.cli import main
from sharelora_cli.outputs import merge
from sharelora_cli.models.quantization import bitsandbytes
from transformers.integrations import bitsandbytes as _hf_bnb
bitsandbytes()
imports = peak()
sys.argv = ["sharelora", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    assert not done.code, done.code
print(json.dumps({"imports": imports, "peak": peak()}))
"""


def build(size: str, workdir: Path) -> dict:
    """Save the random base and its two adapters (full-precision and 4-bit); returns their facts."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **SIZES[size])
    model = LlamaForCausalLM(config)
    base = workdir / size / "base"
    model.save_pretrained(base, max_shard_size=SHARD)
    largest = max(p.numel() for p in model.parameters()) * 4  # float32 bytes
    parameters = sum(p.numel() for p in model.parameters())
    adapter = inject_adapter(model, AdapterConfig(method="lora", rank=RANK, targets=TARGETS))
    with torch.no_grad():
        for factor in adapter.parameters():
            factor.normal_(0, 0.02)
    save_adapter(adapter, workdir / size / "adapter-fp", base_model=str(base))
    save_adapter(
        adapter, workdir / size / "adapter-4bit", base_model=str(base), extra={"quantization": FOUR_BIT.model_dump()}
    )
    return {
        "parameters": parameters,
        "largest_tensor": largest,
        "adapter": (workdir / size / "adapter-fp" / "adapter.safetensors").stat().st_size,
        "base_files": sum(f.stat().st_size for f in base.glob("*.safetensors")),
    }


def run_merge(adapter: Path, out: Path) -> dict:
    command = ["merge", "--adapter", str(adapter), "--out", str(out), "--max-shard-size", SHARD]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *command],
        check=True,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
    )
    seconds = time.perf_counter() - start
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"command": "sharelora " + " ".join(command), "seconds": round(seconds, 1), "written": written, **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write bases and merges (temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    rows = []
    try:
        for size in args.sizes.split(","):
            facts = build(size, workdir)
            for path in ("fp", "4bit"):
                row = {"size": size, "path": path, **facts}
                row |= run_merge(workdir / size / f"adapter-{path}", workdir / size / f"merged-{path}")
                row["above_imports"] = row["peak"] - row["imports"]
                cast = row["largest_tensor"] // 2 if path == "4bit" else 0  # float32 -> bfloat16 compute dtype
                row["bound"] = SHARD_BYTES + row["largest_tensor"] + cast + row["adapter"]
                row["overhead"] = row["above_imports"] - row["bound"]
                rows.append(row)
                shutil.rmtree(workdir / size / f"merged-{path}")
            shutil.rmtree(workdir / size)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    mib = 2**20
    print("| model | path | base files | merge time | imports | peak | above imports | bound | rest |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['size']} ({r['parameters'] / 1e6:.0f}M) | {r['path']} | {r['base_files'] / mib:,.0f} MiB | "
            f"{r['seconds']} s | {r['imports'] / mib:,.0f} MiB | {r['peak'] / mib:,.0f} MiB | "
            f"{r['above_imports'] / mib:,.0f} MiB | {r['bound'] / mib:,.0f} MiB | {r['overhead'] / mib:,.0f} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
