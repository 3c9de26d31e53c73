"""The launch-overhead proxy: operator dispatches per adapted module and training step stay at most 14.

scripts/profile_step.py --dispatches counts them on a 2-layer Llama with all seven projections
adapted, over a float32 and an NF4 base (definition in its docstring). The count is deterministic for
one torch version; the bound is the target from issue 17 (sharelora LoRA was 44.9 and PEFT LoRA
42.1 on a float32 base, by this count, before the fused path), not what one run printed, so a
torch upgrade that moves a few ops does not fail it while a per-module op crept back in does.
"""

import json
import subprocess
import sys
from pathlib import Path

from sharelora_cli.core.paths import PROJECT_ROOT

TARGET = 14


def test_lora_and_sharea_dispatch_at_most_14_ops_per_module_on_fp32_and_nf4_bases(tmp_path: Path):
    out = tmp_path / "dispatches.json"
    command = [
        sys.executable,
        "scripts/profile_step.py",
        "--dispatches",
        "lora",
        "sharea",
        "peft-lora",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    counts = json.loads(out.read_text())
    assert set(counts) == {"fp32", "nf4"}
    for base, per_config in counts.items():
        for name in ("lora", "sharea"):
            assert 0 < per_config[name] <= TARGET, (base, name, per_config)
            assert per_config[name] < per_config["peft-lora"], (base, name, per_config)
    assert "| lora |" in result.stdout
