"""README's "Bring your own data" runs as written: its bash blocks, in a fresh folder, give what it says."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sharelora_cli.core.paths import PROJECT_ROOT, data_dir

START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"
STEP_LINE = re.compile(
    r"^step (\d+)/(\d+)  loss \d+\.\d{4}  lr \S+  tok/s \d+  epoch \d+\.\d\d(  val_loss \d+\.\d{4})?$"
)


def walkthrough() -> str:
    """The README section between the walkthrough markers."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index(START) : readme.index(END)]


def blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The section's commands run as one bash script (stopping at the first failure) in an empty folder
    holding only scripts/, with the venv's sharelora and python first on PATH, as after `source .venv/bin/activate`."""
    folder = tmp_path_factory.mktemp("walkthrough")
    (folder / "scripts").symlink_to(PROJECT_ROOT / "scripts")
    script = "\n".join(blocks(walkthrough(), "bash"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SHARELORA_DATA": str(data_dir().resolve()),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder, result


def test_the_walkthrough_has_commands_for_every_step():
    script = "\n".join(blocks(walkthrough(), "bash"))
    for command in ("make_tiny_model.py", "sharelora train", "sharelora eval", "sharelora merge", "sharelora export"):
        assert command in script
    assert "format: alpaca" in script and "data.format=chat" in script


def test_the_walkthrough_leaves_every_file_it_names(walked):
    folder, _ = walked
    for path in (
        "runs/my-alpaca/adapter/adapter.safetensors",
        "runs/my-alpaca/summary.json",
        "runs/my-alpaca-merged/config.json",
        "runs/my-alpaca-peft/adapter_config.json",
        "runs/my-alpaca-lora/adapter_config.json",
        "runs/my-chat/adapter/adapter.safetensors",
        "runs/my-chat-merged/config.json",
    ):
        assert (folder / path).is_file(), path
    assert json.loads((folder / "runs/my-alpaca-peft/adapter_config.json").read_text())["peft_type"] == "LORA"


def test_the_printed_data_and_step_lines_are_the_readmes(walked):
    """The rows shown and the data line are exact (they depend on the data and the tokenizer only); the step
    lines have the README's steps (their numbers depend on the CPU's arithmetic and speed)."""
    _, result = walked
    rows, shown = (block.splitlines() for block in blocks(walkthrough(), "text")[:2])
    printed = result.stdout.splitlines() + result.stderr.splitlines()
    assert all(row in printed for row in rows)
    data_line = next(line for line in shown if line.startswith("data: "))
    assert data_line in printed and "packed (best_fit)" in data_line
    shown_steps = [STEP_LINE.match(line) for line in shown if line.startswith("step ")]
    run_steps = [STEP_LINE.match(line) for line in printed if line.startswith("step ")]
    assert all(shown_steps) and all(run_steps)
    # The alpaca run's lines come first (the chat run follows it).
    assert [m.group(1, 2) for m in run_steps[: len(shown_steps)]] == [m.group(1, 2) for m in shown_steps]


def test_training_lowers_the_held_out_perplexity_and_merging_keeps_it(walked):
    folder, _ = walked
    perplexity = {
        name: json.loads((folder / f"runs/my-alpaca/eval-{name}.json").read_text())["perplexity"]
        for name in ("base", "adapter", "merged")
    }
    assert perplexity["adapter"]["num_tokens"] == perplexity["base"]["num_tokens"] > 0
    assert perplexity["adapter"]["token_perplexity"] < perplexity["base"]["token_perplexity"]
    # float32: merging rounds each weight once (relative 2^-24); through 4 layers the mean log-likelihood of
    # a few thousand tokens moves by orders of magnitude less than 1e-5 of itself.
    assert perplexity["merged"]["nll_per_token"] == pytest.approx(perplexity["adapter"]["nll_per_token"], rel=1e-5)
