"""FSDP2 with shared factors: every method under 2 gloo processes equals one process; nothing silent."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_module import load_script

from sharelora_cli.config.recipe import DistributedConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.training.launch import worker_command
from sharelora_cli.training.run_lock import LOCK_FILE, RunLock
from sharelora_cli.training.sharding import resolve, take_launch_request

fsdp_check = load_script("fsdp_check")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def check(tmp_path_factory, tiny_model_dir):
    """Every method trained once in this process and once under FSDP2 (one launch of 2 processes for all)."""
    out = tmp_path_factory.mktemp("fsdp")
    rows = fsdp_check.run_check(out, list(fsdp_check.METHODS), tiny_model_dir)
    return out, {row.method: row for row in rows}


@pytest.mark.parametrize("method", fsdp_check.METHODS)
def test_fsdp2_with_two_processes_trains_like_one_process(check, method):
    out, rows = check
    assert rows[method].ok, rows[method].line()
    summaries = {name: json.loads((out / method / name / "summary.json").read_text()) for name in ("single", "fsdp2")}
    assert (summaries["single"]["strategy"], summaries["single"]["processes"]) == ("single", 1)
    assert (summaries["fsdp2"]["strategy"], summaries["fsdp2"]["processes"]) == ("fsdp2", 2)


def launch(recipe: Path, *overrides: str, processes: int = 2) -> list[str]:
    return worker_command(processes, ["train", str(recipe), *overrides])


def test_killed_fsdp2_run_resumes_to_the_uninterrupted_adapter(check, tmp_path):
    """SIGKILL after checkpoint-5 (no chance to clean up: its lock stays behind), then resume=true."""
    out, _ = check
    recipe = out / "aslora" / "fsdp2-recipe.0.yaml"  # the uninterrupted run's recipe; ASLoRA merges at step 5
    run = tmp_path / "run"
    proc = subprocess.Popen(
        launch(recipe, f"output_dir={run}"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (run / "checkpoint-5").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # torch.distributed.run starts each worker in a session of its own: kill the workers, then the launcher.
    for worker in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        os.kill(int(worker), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert (run / "checkpoint-5").is_dir() and not (run / "adapter").exists(), "the run ended before it was killed"
    assert (run / LOCK_FILE).is_file()

    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "sharelora_cli",
            "train",
            str(recipe),
            f"output_dir={run}",
            "resume=true",
            "train.distributed.strategy=auto",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert one.returncode == 2
    assert (
        one.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "was written by 2 process(es), this run has 1; resume with --num_processes 2, or start a new output_dir"
        )
    )

    resumed = subprocess.run(
        launch(recipe, f"output_dir={run}", "resume=true"), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.splitlines()[0] == "distributed: fsdp2, 2 processes"
    expected = load_file(out / "aslora" / "fsdp2" / "adapter" / "adapter.safetensors")
    actual = load_file(run / "adapter" / "adapter.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:  # the same processes in the same order: the same arithmetic, bit for bit
        assert torch.equal(actual[name], expected[name]), name
    assert not (run / LOCK_FILE).exists()


def test_a_second_run_into_a_locked_output_dir_stops_in_one_line(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(f"{os.getppid()} {os.uname().nodename}\n")  # a live process holds it
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "output_dir": str(run)}))
    result = subprocess.run(
        [sys.executable, "-m", "sharelora_cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: output_dir {run} is in use by process {os.getppid()} (lock file {run / LOCK_FILE}); "
        "wait for it to finish or choose another output_dir"
    ]


def test_a_lock_left_by_a_dead_process_is_recovered(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(f"{finished.stdout.strip()} {os.uname().nodename}\n")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    lock.release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"},
            "TRANSFORMER_BASED_WRAP",
        ),
    ],
)
def test_a_launch_request_that_cannot_be_honoured_is_refused(env, needle):
    with pytest.raises(UserError, match=needle):
        take_launch_request(dict(env))


def test_an_fsdp_launch_is_taken_from_accelerate_and_never_becomes_ddp():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    request = take_launch_request(env)
    assert request is not None and not request.reshard_after_forward
    assert "ACCELERATE_USE_FSDP" not in env  # Accelerator must not build its own FSDP plugin
    with pytest.raises(UserError, match="strategy=ddp"):
        resolve(DistributedConfig(strategy="ddp"), request, 2)
    with pytest.raises(UserError, match="needs a distributed launch"):
        resolve(DistributedConfig(strategy="auto"), request, 1)  # no process group in this test process
    assert resolve(DistributedConfig(), None, 1).strategy == "single"
    assert resolve(DistributedConfig(), None, 2).strategy == "ddp"


def test_deepspeed_launch_stops_the_cli_in_one_line(tmp_path, tiny_model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "output_dir": str(tmp_path / "r")}))
    result = subprocess.run(
        [sys.executable, "-m", "sharelora_cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        env={**ENV, "ACCELERATE_USE_DEEPSPEED": "true"},
        timeout=600,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "shard with FSDP2 instead" in result.stderr
