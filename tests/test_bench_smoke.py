"""scripts/bench_train.py runs end to end at tiny sizes and writes the documented JSON rows (timings unchecked)."""

import json
import subprocess
import sys
from pathlib import Path

from sharelora_cli.core.paths import PROJECT_ROOT

FIELDS = {
    "name",
    "step_time_s",
    "peak_mem_bytes",
    "optimizer_state_bytes",
    "trainable_params",
    "ratio_to_floor",
    "ratio_to_peft_lora",
    "ratio_to_lora",
}
NAMES = [
    "floor",
    "peft-lora",
    "lora",
    "sharea",
    "shareb",
    "shareab",
    "miss",
    "peft-miss",
    "aslora",
    "vera",
    "peft-vera",
    "tied-lora",
    "vblora",
    "peft-vblora",
    "lily",
    "peft-lily",
    "unilora",
    "peft-unilora",
    "tinylora",
    "peft-tinylora",
    "randlora",
    "peft-randlora",
]


def test_bench_train_smoke_writes_every_row(tmp_path: Path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "scripts/bench_train.py",
        "--preset",
        "smoke",
        "--rounds",
        "1",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
        "--markdown",
        str(tmp_path / "bench.md"),
    ]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert list(rows) == NAMES and all(set(row) == FIELDS for row in rows.values())
    assert rows["floor"]["trainable_params"] == 0 and rows["floor"]["optimizer_state_bytes"] == 0
    # Same targets and rank: sharelora's LoRA has PEFT's parameter count, and sharing only removes parameters.
    assert rows["lora"]["trainable_params"] == rows["peft-lora"]["trainable_params"]
    assert rows["miss"]["trainable_params"] == rows["peft-miss"]["trainable_params"]
    assert rows["vera"]["trainable_params"] == rows["peft-vera"]["trainable_params"]
    assert rows["vblora"]["trainable_params"] == rows["peft-vblora"]["trainable_params"]
    assert rows["lily"]["trainable_params"] == rows["peft-lily"]["trainable_params"]
    assert rows["unilora"]["trainable_params"] == rows["peft-unilora"]["trainable_params"] == 256
    # TinyLoRA: one v of u = 64 per adapted module, 7 projections × 2 layers.
    assert rows["tinylora"]["trainable_params"] == rows["peft-tinylora"]["trainable_params"] == 64 * 7 * 2
    # RandLoRA at r = 4: n = m/4 bases per projection of smaller side m, each training λ (4 × n) and γ (n × m).
    # Smaller sides: q, o, gate, up, down 64 (n = 16), k, v 32 (n = 8): per layer 5·16·68 + 2·8·36 = 6,016.
    assert rows["randlora"]["trainable_params"] == rows["peft-randlora"]["trainable_params"] == 2 * 6_016
    assert rows["vera"]["trainable_params"] < rows["tied-lora"]["trainable_params"] < rows["lora"]["trainable_params"]
    assert rows["shareab"]["trainable_params"] < rows["sharea"]["trainable_params"] < rows["lora"]["trainable_params"]
    # AdamW keeps two float32 moments per trainable parameter (plus a step counter per tensor).
    for name in NAMES[1:]:
        moments = 2 * 4 * rows[name]["trainable_params"]
        assert moments <= rows[name]["optimizer_state_bytes"] <= moments + 64 * 4 * 8
    assert rows["lora"]["ratio_to_peft_lora"] > 0 and rows["floor"]["ratio_to_floor"] == 1.0
    assert rows["lora"]["ratio_to_lora"] == 1.0 and rows["sharea"]["ratio_to_lora"] > 0
    assert "| lora |" in (tmp_path / "bench.md").read_text()


def test_skip_memory_times_every_configuration_and_leaves_peak_memory_null(tmp_path: Path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "scripts/bench_train.py",
        "--preset",
        "smoke-nf4",
        "--configs",
        "floor,lora,peft-vblora",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--skip-memory",
        "--json",
        str(out),
    ]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    # PEFT's VB-LoRA cannot wrap 4-bit layers: left out of an NF4 preset, with a note.
    assert [row["name"] for row in rows] == ["floor", "lora"] and "peft-vblora" in result.stderr
    assert all(set(row) == FIELDS and row["peak_mem_bytes"] is None and row["step_time_s"] > 0 for row in rows)


def test_bench_adapter_layer_smoke_prints_every_shape():
    command = [sys.executable, "scripts/bench_adapter_layer.py", "--tokens", "16", "--repeats", "1", "--threads", "1"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for shape in ("512→512", "512→256", "512→1536", "1536→512"):
        assert f"{shape}: floor" in result.stdout
    assert result.stdout.count("sharelora +") == 4
