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
from cli_runner import run_cli
from numerics import assert_within, gamma
from safetensors.torch import load_file
from script_module import load_script
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.adapters.adapter_io import load_adapter
from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, DistributedConfig, ModelConfig, QuantizationConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.quantization import linear4bit_modules
from sharelora_cli.training.launch import worker_command
from sharelora_cli.training.run_lock import LOCK_FILE, RunLock
from sharelora_cli.training.sharding import Distribution, check_fsdp2_quantization, resolve, take_launch_request

fsdp_check = load_script("fsdp_check")
fsdp_memory = load_script("fsdp_memory")
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
    for name, how in (("single", ("single", 1)), ("fsdp2", ("fsdp2", 2))):
        rows = (out / method / name / "metrics.jsonl").read_text().splitlines()
        assert {(row["strategy"], row["processes"]) for row in map(json.loads, rows)} == {how}


def adapted_modules(model) -> dict[str, AdaptedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def module_outputs(
    model, names, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The logits and each named module's (input, output) in one forward; outputs keep their gradients."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            seen[name] = (args[0].detach(), output)

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    logits = model(ids).logits
    for handle in hooks:
        handle.remove()
    return logits, seen


def merge_error_bound(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    """|W'x − (Wx + s·B·A·x)| allowed, W' being the merged fp32 weight, both sides evaluated in float64.

    merge computes s·B·A in float32 (sums of rank products, then the scaling; VeRA's diagonal scalings
    are two more products) and adds W: each entry of W' is off by at most γ_{rank+4}·(|W| + |s|·|B|·|A|).
    The float64 forwards add their own reordering, 2·γ_{d_in+rank+4} of the same magnitudes.
    """
    lora_A, lora_B, scaling = layer.low_rank()
    magnitude = layer.base_layer.weight.abs() + abs(scaling) * (lora_B.abs() @ lora_A.abs())
    rank = lora_A.shape[0]
    relative = gamma(rank + 4, torch.float32) + 2 * gamma(layer.d_in + rank + 4, torch.float64)
    return relative * (x.abs() @ magnitude.t())


@pytest.mark.parametrize("method", ["sharea", "aslora", "vera"])
def test_merge_of_an_fsdp2_trained_adapter_equals_base_plus_adapter(
    check, method, tiny_model_dir, shared_data, tmp_path
):
    """`sharelora merge` of the adapter 2 FSDP2 processes saved (shared factors gathered; ASLoRA merged at step 5).

    Compared in float64, where the only difference left is the merged weights' float32 arithmetic: each adapted
    module on the same input within merge_error_bound, and the logits within those bounds carried to them by
    the gradient (first order; the factor 2 covers the second-order terms, smaller by |ΔW'|/|W| ≈ 1e-7).
    """
    out, _ = check
    adapter_dir = out / method / "fsdp2" / "adapter"
    result = run_cli("merge", "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged"), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    question = json.loads((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(question["question"], return_tensors="pt").input_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    base_logits = model(ids).logits.detach()
    load_adapter(model, adapter_dir)
    layers = adapted_modules(model)
    adapted, io = module_outputs(model, layers, ids)
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    with torch.no_grad():
        merged = merged_model(ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the trained adapter changes the model

    (torch.sign(merged - adapted) * adapted).sum().backward()  # d‖merged − adapted‖₁ / d(module outputs)
    carried = 0.0
    with torch.no_grad():
        for name, layer in layers.items():
            x, y = io[name]
            bound = merge_error_bound(layer, x)
            assert_within(merged_model.get_submodule(name)(x), y, bound)
            carried += float((y.grad.abs() * bound).sum())
    assert float((merged - adapted.detach()).abs().sum()) <= 2 * carried


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
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
            "train.gradient_checkpointing=true",
        ),
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


def test_a_4bit_base_loaded_for_fsdp2_holds_the_same_bytes_in_the_compute_dtype(tiny_model_dir):
    """bnb_4bit_quant_storage = the compute dtype: the dtype of every other weight, so FSDP2 can shard it."""
    quant = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")
    model = ModelConfig(name_or_path=str(tiny_model_dir))
    plain, sharded = (load_model(model, quant, torch.device("cpu"), sharded=s) for s in (False, True))
    pairs = list(zip(linear4bit_modules(plain), linear4bit_modules(sharded), strict=True))
    assert pairs
    for one, other in pairs:
        assert (one.weight.dtype, other.weight.dtype) == (torch.uint8, torch.float32)
        assert torch.equal(other.weight.data.view(torch.uint8).flatten(), one.weight.data.flatten())
    assert {p.dtype for p in sharded.parameters()} == {torch.float32}


def test_qlora_under_fsdp2_with_two_processes_trains_like_one_process(tmp_path, tiny_model_dir):
    """The 4-bit base sharded by FSDP2 over 2 gloo processes: the losses of one process on the same global batch."""
    runs = {}
    for name, fsdp2 in (("single", False), ("fsdp2", True)):
        settings = fsdp_check.recipe("sharea", tiny_model_dir, tmp_path / name, fsdp2)
        settings["quantization"] = {"load_in_4bit": True, "compute_dtype": "float32"}
        settings["train"]["max_steps"] = 3
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(json.dumps(settings))
        command = launch(recipe) if fsdp2 else [sys.executable, "-m", "sharelora_cli", "train", str(recipe)]
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, two = runs["single"], runs["fsdp2"]
    assert [(row["strategy"], row["processes"]) for row in two] == [("fsdp2", 2)] * 3
    tokens = one[0]["tokens"]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= fsdp_check.mean_loss_bound(a["step"], tokens, a["loss"])


def test_fsdp2_bf16_over_a_4bit_base_needs_a_bf16_compute_dtype():
    quant = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")
    with pytest.raises(UserError, match="set quantization.compute_dtype=bfloat16"):
        check_fsdp2_quantization(quant, "bf16", Distribution("fsdp2", 2))
    check_fsdp2_quantization(quant, "no", Distribution("fsdp2", 2))
    check_fsdp2_quantization(quant, "bf16", Distribution("ddp", 2))


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32-base", "4bit-base"])
def test_fsdp2_leaves_each_process_half_of_the_frozen_base_and_of_the_adapter(tmp_path, tiny_model_dir, load_in_4bit):
    """Counted from each process's local shards after a step (scripts/fsdp_memory.py): every dimension of the
    tiny Llama is even, so each of 2 processes holds exactly half of every tensor, its gradient and Adam state;
    a 4-bit base's packed weights too (held as float32 for FSDP2)."""
    rows = fsdp_memory.run_strategy(tiny_model_dir, tmp_path, "fsdp2", 1, load_in_4bit)
    quant = QuantizationConfig(load_in_4bit=load_in_4bit, compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), quant, torch.device("cpu"), sharded=True)
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    settings = fsdp_memory.recipe(tiny_model_dir, tmp_path, "fsdp2", 1, load_in_4bit)
    adapter = inject_adapter(model, AdapterConfig(**settings["adapter"]))
    trainable = 4 * adapter.num_trainable()  # float32
    for row in rows:
        assert (row["strategy"], row["processes"]) == ("fsdp2", 2)
        assert 2 * row["base_param_bytes"] == base
        assert 2 * row["adapter_param_bytes"] == 2 * row["grad_bytes"] == trainable
        assert 2 * row["optimizer_state_bytes"] == 2 * trainable + 2 * 4 * len(adapter.parameters())  # m, v; steps
