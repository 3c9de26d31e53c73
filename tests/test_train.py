"""`sharelora train` end to end on the tiny model and real GSM8K text."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sharelora_cli.config.recipe import load_recipe
from sharelora_cli.core.errors import UserError
from sharelora_cli.training.liger import require_liger_kernel
from sharelora_cli.training.loop import train

SHARELORA = [sys.executable, "-m", "sharelora_cli"]


def write_recipe(tmp_path: Path, model_dir: Path, **sections) -> Path:
    """A small recipe on the tiny model; sections override the defaults below."""
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"method": "sharea", "rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "down_proj"]},
        "data": {"max_length": 256, "overlength": "drop", "max_examples": 300, "validation_fraction": 0.1},
        "train": {
            "max_steps": 12,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 6,
            "eval_batches": 2,
            "checkpoint_every": 4,
        },
        "output_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def train_and_resume(recipe: Path, tmp: Path) -> dict:
    """Train the recipe to tmp/full, then again from its checkpoint as if killed right after writing it (tmp/resumed)."""
    full = tmp / "full"
    summary = train(load_recipe(str(recipe), [f"output_dir={full}"]))
    resumed = tmp / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "adapter")
    (resumed / "summary.json").unlink()
    train(load_recipe(str(recipe), [f"output_dir={resumed}", "resume=true"]))
    return {"full": full, "resumed": resumed, "trainable": summary.trainable_parameters}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*SHARELORA, *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def test_training_lowers_validation_loss_on_gsm8k(tmp_path, tiny_model_dir):
    recipe = load_recipe(str(write_recipe(tmp_path, tiny_model_dir)), ["train.max_steps=30", "train.eval_every=10"])
    summary = train(recipe)
    metrics = read_metrics(Path(recipe.output_dir))
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3 and val[0] > val[1] > val[2]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2
    assert all({"step", "loss", "lr"} <= set(m) for m in metrics)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert summary.steps == 30 and summary.trainable_parameters > 0
    run = Path(recipe.output_dir)
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "recipe.yaml").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-24", "checkpoint-28"]


@pytest.mark.parametrize("packing", [False, True], ids=["examples", "packed"])
def test_grad_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir, packing):
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        data={"packing": packing},
        train={"max_steps": 3, "checkpoint_every": 100, "eval_every": 100},
    )
    big = train(load_recipe(str(path), ["train.batch_size=8", f"output_dir={tmp_path / 'big'}"]))
    accumulated = train(
        load_recipe(str(path), ["train.batch_size=2", "train.grad_accum=4", f"output_dir={tmp_path / 'acc'}"])
    )
    big_losses = [m["loss"] for m in read_metrics(tmp_path / "big")]
    acc_losses = [m["loss"] for m in read_metrics(tmp_path / "acc")]
    assert big_losses == pytest.approx(acc_losses, abs=1e-5)
    a = load_file(tmp_path / "big" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "acc" / "adapter" / "adapter.safetensors")
    # The two runs sum the same fp32 gradients in another order. AdamW scales each element's step to about
    # lr whatever the gradient's size, so where a gradient is near zero that rounding can move a few
    # elements by up to a step (elementwise bounds then depend on thread count); the root mean square
    # difference stays far below one step: here under 0.1% of lr.
    lr = load_recipe(str(path)).train.lr
    assert all((a[k] - b[k]).pow(2).mean().sqrt() < 1e-3 * lr for k in a)
    assert big.tokens == accumulated.tokens


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, adapter={"dropout": 0.1}, train={"max_steps": 12})
    reference = tmp_path / "reference"
    train(load_recipe(str(path), [f"output_dir={reference}"]))

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*SHARELORA, "train", str(path), f"output_dir={killed}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-4").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-4").is_dir() and not (killed / "adapter").exists()

    result = run_cli("train", str(path), f"output_dir={killed}", "resume=true")
    assert result.returncode == 0, result.stderr
    expected = load_file(reference / "adapter" / "adapter.safetensors")
    resumed = load_file(killed / "adapter" / "adapter.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.allclose(expected[name], resumed[name], atol=1e-6, rtol=0), name
    steps = [m["step"] for m in read_metrics(killed)]
    assert steps == list(range(1, 13))


def test_existing_checkpoints_need_resume(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, train={"max_steps": 4})
    train(load_recipe(str(path)))
    result = run_cli("train", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "resume=true" in result.stderr


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, train={"max_steps": 10_000, "checkpoint_every": 10_000})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*SHARELORA, "train", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "resume=true" in stderr
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert step == json.loads(metrics.read_text().splitlines()[-1])["step"]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        adapter={"method": "shareb"},
        train={"max_steps": 4, "checkpoint_every": 100, "eval_every": 2},
    )
    train(load_recipe(str(path), ["train.batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--num_processes",
        "2",
        "--cpu",
        "-m",
        "sharelora_cli",
        "train",
        str(path),
        "train.batch_size=2",
        f"output_dir={tmp_path / 'two'}",
    ]
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert {(m["strategy"], m["processes"]) for m in one} == {("single", 1)}  # every row says how it ran
    assert {(m["strategy"], m["processes"]) for m in two} == {("ddp", 2)}
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], abs=1e-4)
    assert [m["val_loss"] for m in one if "val_loss" in m] == pytest.approx(
        [m["val_loss"] for m in two if "val_loss" in m], abs=1e-4
    )
    a = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_compiled_training_gives_the_eager_losses(tmp_path, tiny_model_dir):
    """train.compile=true (torch.compile through Accelerate: inductor's C++ code on CPU) trains like eager.

    The compiled run is its own process, since Accelerate keeps one compile setting per process. Packed
    rows give every step one shape, so the model compiles once; no validation pass keeps it at that.
    """
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        adapter={"targets": ["q_proj", "k_proj", "v_proj", "down_proj"]},
        data={"max_length": 128, "packing": "stream", "max_examples": 64, "validation_fraction": 0.0},
        train={"max_steps": 3, "batch_size": 2, "checkpoint_every": 100},
    )
    train(load_recipe(str(path), [f"output_dir={tmp_path / 'eager'}"]))
    inductor = tmp_path / "inductor"  # its own cache: the run compiles, and leaves the code it generated here
    result = run_cli(
        "train",
        str(path),
        "train.compile=true",
        f"output_dir={tmp_path / 'compiled'}",
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(inductor)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(path.suffix == ".py" for path in inductor.rglob("*"))
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    # float32 throughout; inductor only reorders sums within a kernel.
    assert [m["loss"] for m in compiled] == pytest.approx([m["loss"] for m in eager], rel=1e-4)


def test_liger_kernel_without_its_package_is_refused_naming_the_key():
    """On a CUDA device with liger-kernel missing, train.liger_kernel stops before anything is loaded."""
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(UserError, match=r"train\.liger_kernel needs the liger-kernel package"):
        require_liger_kernel(torch.device("cuda"))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.liger_kernel=true"], "train.liger_kernel needs a CUDA GPU"),
        (["train.cuda_graphs=true"], "train.cuda_graphs captures the graphs torch.compile makes"),
        (["train.cuda_graphs=true", "train.compile=true"], "train.cuda_graphs needs a CUDA GPU"),
    ],
)
def test_gpu_only_options_are_refused_in_one_line_on_cpu(tmp_path, tiny_model_dir, overrides, needle):
    if torch.cuda.is_available():
        pytest.skip("these options are valid on a CUDA machine")
    path = write_recipe(tmp_path, tiny_model_dir)
    result = run_cli("train", str(path), *overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "run" / "checkpoint-4").exists()
