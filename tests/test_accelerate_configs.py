"""The shipped Accelerate configs (recipes/accelerate/*.yaml), and real `accelerate launch` FSDP requests on CPU.

A launch that asks for FSDP trains as FSDP2 (summary.json, metrics.jsonl and the first line say so) or stops
with one line saying what to do; it never falls back to DDP.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

from sharelora_cli.core.paths import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "recipes" / "accelerate"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
EXPECTED = {
    "single-gpu": (DistributedType.NO, 1),
    "ddp": (DistributedType.MULTI_GPU, 1),
    "fsdp2": (DistributedType.FSDP, 1),
    "fsdp2-qlora": (DistributedType.FSDP, 1),
    "multi-node": (DistributedType.FSDP, 2),
}


def test_every_shipped_config_is_one_of_the_documented_ones():
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_accelerate_loads_the_shipped_config(name):
    """Accelerate's own loader (it refuses unknown top-level keys); FSDP keys are launch options, FSDP2 only."""
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert (config.distributed_type, config.num_machines) == EXPECTED[name]
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= launch_options
    if config.distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert config.fsdp_config["fsdp_offload_params"] is False
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port


def recipe(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    settings = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"method": "sharea", "rank": 4, "dropout": 0.0},
        "data": {"max_length": 128, "overlength": "drop", "max_examples": 40, "validation_fraction": 0.1},
        "train": {"max_steps": 2, "batch_size": 1, "eval_every": 2, "eval_batches": 1, "report_to": []},
    }
    path.write_text(json.dumps(settings))
    return path


def free_port() -> int:
    """A port free now. Every launch would otherwise rendezvous on Accelerate's default, 29500, and two launches
    on parallel test workers would meet there: one of them then dies mid-start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(tmp_path: Path, model_dir: Path, *options: str) -> tuple[subprocess.CompletedProcess, Path]:
    run = tmp_path / "run"
    port = ("--main_process_port", str(free_port()))
    command = [ACCELERATE, "launch", *options, *port, "-m", "sharelora_cli", "train", str(recipe(tmp_path, model_dir))]
    result = subprocess.run([*command, f"output_dir={run}"], capture_output=True, text=True, env=ENV, timeout=600)
    return result, run


@pytest.mark.parametrize(
    "options",
    [
        ("--num_processes", "2", "--use_fsdp", "--fsdp_version", "2"),
        ("--config_file", str(CONFIGS / "fsdp2.yaml")),
    ],
    ids=["flags", "config-file"],
)
def test_an_accelerate_fsdp2_launch_on_cpu_trains_as_fsdp2(tmp_path, tiny_model_dir, options):
    result, run = accelerate_launch(tmp_path, tiny_model_dir, *options)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == "distributed: fsdp2, 2 processes"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["strategy"], summary["processes"], summary["steps"]) == ("fsdp2", 2, 2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["strategy"], row["processes"]) for row in rows] == [(1, "fsdp2", 2), (2, "fsdp2", 2)]


def test_an_accelerate_fsdp1_launch_stops_with_what_to_do(tmp_path, tiny_model_dir):
    """--use_fsdp alone means FSDP version 1: each process stops with the same line, nothing is trained."""
    result, run = accelerate_launch(tmp_path, tiny_model_dir, "--num_processes", "2", "--use_fsdp")
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert errors == {
        "error: the launch asks for FSDP version 1; sharelora shards with FSDP2: "
        "set fsdp_version: 2 in the Accelerate config (or pass --fsdp_version 2)"
    }
    assert "distributed:" not in result.stdout and not (run / "adapter").exists()
