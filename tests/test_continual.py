"""Continual fine-tuning: continuing a saved adapter, stages, evaluation during training, trackers, the summaries."""

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_runner import assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_train import SHARELORA, read_metrics, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.adapters.adapter_io import load_adapter
from sharelora_cli.config.recipe import Tracker, load_recipe
from sharelora_cli.data.examples import IGNORE_INDEX, StepSampler, build_splits, collate
from sharelora_cli.evaluation.runner import CodeExecution
from sharelora_cli.training.continual_metrics import ContinualTask, format_table, summarize
from sharelora_cli.training.loop import set_up, token_loss_sum, train
from sharelora_cli.training.metrics_log import PIP_NAMES
from sharelora_cli.training.run_lock import RunLock

# A few greedy tokens on three GSM8K test questions: enough to exercise generation, cheap on CPU.
SMALL_EVAL = {"tasks": ["gsm8k"], "limit": 3, "gsm8k": {"num_fewshot": 0, "max_new_tokens": 8}}


def first_batch_loss(recipe, adapter_dir: Path) -> float:
    """The loss a saved adapter has on the batch a run of `recipe` starts with, computed outside the trainer."""
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path)
    load_adapter(model, adapter_dir)
    splits = build_splits(recipe.data, tokenizer, recipe.train.seed)
    sampler = StepSampler(len(splits.train), recipe.train.batch_size, 1, 1, 0, recipe.train.seed)
    batch = collate([splits.train[i] for i in sampler.micro_batches(0)[0]], tokenizer.pad_token_id)
    with torch.no_grad():
        return float(token_loss_sum(model, batch) / (batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("method", ["sharea", "aslora"])
def test_a_run_continued_from_a_saved_adapter_starts_at_its_loss(tmp_path, tiny_model_dir, method):
    path = write_recipe(tmp_path, tiny_model_dir, adapter={"method": method}, train={"max_steps": 6})
    first = train(load_recipe(str(path), [f"output_dir={tmp_path / 'first'}"]))
    saved = tmp_path / "first" / "adapter"
    continued = load_recipe(
        str(path),
        [f"output_dir={tmp_path / 'next'}", f"adapter.init_from={saved}", "train.max_steps=2", "train.seed=7"],
    )
    summary = train(continued)
    assert read_metrics(tmp_path / "next")[0]["loss"] == pytest.approx(first_batch_loss(continued, saved), rel=1e-6)
    # ASLoRA keeps the plan its merges left: as few trainable tensors as the first run ended with.
    assert summary.trainable_parameters == first.trainable_parameters
    plan = json.loads((saved / "sharelora_config.json").read_text())["plan"]
    assert json.loads((tmp_path / "next" / "adapter" / "sharelora_config.json").read_text())["plan"] == plan


@pytest.mark.parametrize(
    "override, named",
    [
        ("adapter.rank=4", "adapter.rank=8"),
        ("adapter.method=shareb", "adapter.method='sharea'"),
        ("adapter.targets=[q_proj]", "adapter.targets="),
    ],
)
def test_continuing_an_adapter_with_other_settings_fails_in_one_line(tmp_path, tiny_model_dir, override, named):
    path = write_recipe(tmp_path, tiny_model_dir, train={"max_steps": 2})
    train(load_recipe(str(path), [f"output_dir={tmp_path / 'first'}"]))
    result = run_cli(
        "train",
        str(path),
        f"output_dir={tmp_path / 'next'}",
        override,
        f"adapter.init_from={tmp_path / 'first' / 'adapter'}",
    )
    assert_one_line_error(result, "adapter.init_from", named)
    assert not (tmp_path / "next" / "metrics.jsonl").exists()


def test_the_optimizer_state_is_fresh_unless_asked_for(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, train={"max_steps": 4, "checkpoint_every": 4})
    train(load_recipe(str(path), [f"output_dir={tmp_path / 'first'}"]))
    checkpoint = tmp_path / "first" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    for carry in (False, True):
        recipe = load_recipe(
            str(path),
            [
                f"output_dir={tmp_path / f'next-{carry}'}",
                f"adapter.init_from={checkpoint}",
                f"adapter.init_optimizer={str(carry).lower()}",
            ],
        )
        lock = RunLock(Path(recipe.output_dir))
        try:
            state = set_up(recipe, CodeExecution(), lock).optimizer.state_dict()["state"]
        finally:
            lock.release()
        assert (len(state) == len(saved)) == carry
        if carry:
            assert all(torch.equal(state[k]["exp_avg"], saved[k]["exp_avg"]) for k in saved)


def test_evaluation_during_training_leaves_the_losses_unchanged(tmp_path, tiny_model_dir):
    # Dropout draws from the RNG that the evaluation reseeds (eval.seed): without restoring it, losses would move.
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        adapter={"dropout": 0.2},
        eval=SMALL_EVAL,
        train={"max_steps": 6, "eval_every": 2, "checkpoint_every": 100},
    )
    train(load_recipe(str(path), [f"output_dir={tmp_path / 'plain'}"]))
    train(load_recipe(str(path), [f"output_dir={tmp_path / 'evaluated'}", "train.eval_tasks=[gsm8k]"]))
    plain, evaluated = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "evaluated")
    assert [m["loss"] for m in plain] == [m["loss"] for m in evaluated]
    scored = [m for m in evaluated if "gsm8k/strict-match" in m]
    assert [m["step"] for m in scored] == [2, 4, 6] and all(m["gsm8k/num_samples"] == 3 for m in scored)
    assert not any("gsm8k/strict-match" in m for m in plain)


def test_trackers_are_accelerates_and_a_missing_one_is_named(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, train={"max_steps": 2})
    train(load_recipe(str(path), [f"output_dir={tmp_path / 'tb'}"]))
    assert list((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))
    train(load_recipe(str(path), [f"output_dir={tmp_path / 'none'}", "train.report_to=[]"]))
    assert not (tmp_path / "none" / "tensorboard").exists() and (tmp_path / "none" / "metrics.jsonl").is_file()
    missing = next((name for name in Tracker.__args__ if not _installed(name)), None)
    if missing is None:
        pytest.skip("every tracker Accelerate supports is installed here")
    result = run_cli("train", str(path), f"output_dir={tmp_path / 'missing'}", f"train.report_to=[{missing}]")
    assert_one_line_error(result, "train.report_to", missing, f"pip install {PIP_NAMES.get(missing, missing)}")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def staged_recipe(tmp_path: Path, model_dir: Path) -> Path:
    """Two stages on GSM8K text, the second at another learning rate; each evaluated on three questions."""
    return write_recipe(
        tmp_path,
        model_dir,
        adapter={"dropout": 0.1},
        eval=SMALL_EVAL,
        train={"max_steps": 6, "checkpoint_every": 2, "eval_every": 3},
        stages=[{"name": "first"}, {"name": "second", "train": {"lr": 1e-3}}],
    )


def test_stages_continue_each_other_and_write_the_matrix(tmp_path, tiny_model_dir):
    result = run_cli("train", str(staged_recipe(tmp_path, tiny_model_dir)))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "continual.json").read_text())
    assert summary["tasks"] == ["first", "second"] and summary["stages_done"] == 2
    assert len(summary["matrix"]) == 2 and all(len(row) == 2 for row in summary["matrix"])
    (first, _), second = summary["matrix"]
    assert summary["average_accuracy_seen"] == pytest.approx([first, sum(second) / 2])
    assert f"average accuracy {summary['average_accuracy']:.4f} (seen tasks {sum(second) / 2:.4f})" in result.stdout
    assert "after second" in result.stdout and "forgetting: first" in result.stdout
    config = json.loads((run / "stage-2" / "adapter" / "sharelora_config.json").read_text())
    assert config["adapter"]["init_from"] == str(run / "stage-1" / "adapter")
    for k in (1, 2):
        assert (run / f"stage-{k}" / "eval.json").is_file() and (run / f"stage-{k}" / "summary.json").is_file()
    assert max(m["lr"] for m in read_metrics(run / "stage-2")) < max(m["lr"] for m in read_metrics(run / "stage-1"))


def test_a_staged_run_killed_in_its_second_stage_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    path = staged_recipe(tmp_path, tiny_model_dir)
    reference = tmp_path / "reference"
    assert run_cli("train", str(path), f"output_dir={reference}").returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*SHARELORA, "train", str(path), f"output_dir={killed}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (killed / "stage-2" / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "stage-1" / "summary.json").is_file() and not (killed / "stage-2" / "adapter").exists()

    refused = run_cli("train", str(path), f"output_dir={killed}")
    assert_one_line_error(refused, "resume=true")
    resumed = run_cli("train", str(path), f"output_dir={killed}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    expected = load_file(reference / "stage-2" / "adapter" / "adapter.safetensors")
    got = load_file(killed / "stage-2" / "adapter" / "adapter.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6, rtol=0), name
    assert [m["step"] for m in read_metrics(killed / "stage-2")] == list(range(1, 7))
    assert json.loads((killed / "continual.json").read_text())["tasks"] == ["first", "second"]


def test_the_continual_summaries_of_a_hand_made_matrix():
    """Three stages, one task each; initial accuracies 0.1, 0.0, 0.2.

    after a: 0.8 0.1 0.3      forgetting a = max(0.8, 0.6) - 0.5 = 0.3;  b = max(0.9) - 0.7 = 0.2
    after b: 0.6 0.9 0.4      backward transfer = mean(0.5 - 0.8, 0.7 - 0.9) = -0.25
    after c: 0.5 0.7 0.9      forward transfer = mean(0.1 - 0.0, 0.4 - 0.2) = 0.15; average = 0.7
    """
    columns = [ContinualTask(name, k, "gsm8k") for k, name in enumerate("abc")]
    rows = [[0.8, 0.1, 0.3], [0.6, 0.9, 0.4], [0.5, 0.7, 0.9]]
    summary = summarize(columns, rows, [0.1, 0.0, 0.2])
    assert summary["average_accuracy"] == pytest.approx(0.7)
    assert summary["forgetting"] == pytest.approx({"a": 0.3, "b": 0.2})
    assert summary["backward_transfer"] == pytest.approx(-0.25)
    assert summary["forward_transfer"] == pytest.approx(0.15)
    assert summary["matrix"] == rows and summary["tasks"] == ["a", "b", "c"]
    # A_k over the k tasks trained: 0.8; (0.6 + 0.9) / 2; the whole last row, which is average_accuracy.
    assert summary["average_accuracy_seen"] == pytest.approx([0.8, 0.75, 0.7])


def test_after_the_first_of_three_stages_the_seen_average_leaves_the_unseen_tasks_out():
    """The issue's example: [0.9, 0, 0] after stage 1 of 3 is A_1 = 0.9, where the mean of the row says 0.3."""
    columns = [ContinualTask(name, k, "gsm8k") for k, name in enumerate("abc")]
    summary = summarize(columns, [[0.9, 0.0, 0.0]], [0.0, 0.0, 0.0])
    assert summary["average_accuracy"] == pytest.approx(0.3)
    assert summary["average_accuracy_seen"] == pytest.approx([0.9])
    assert "average accuracy 0.3000 (seen tasks 0.9000)" in format_table(summary, ["a", "b", "c"])


def test_a_stage_scored_by_two_tasks_counts_both_as_seen():
    columns = [ContinualTask("a-gsm8k", 0, "gsm8k"), ContinualTask("a-mmlu", 0, "mmlu"), ContinualTask("b", 1, "gsm8k")]
    summary = summarize(columns, [[0.6, 0.4, 0.1], [0.5, 0.3, 0.7]], [0.0, 0.0, 0.0])
    assert summary["average_accuracy_seen"] == pytest.approx([0.5, 0.5])
    assert summary["average_accuracy"] == pytest.approx(0.5)


def test_summaries_after_the_first_stage_only():
    columns = [ContinualTask("a", 0, "gsm8k"), ContinualTask("b", 1, "mmlu")]
    summary = summarize(columns, [[0.5, 0.3]], [0.1, 0.2])
    assert summary["forgetting"] == {} and summary["backward_transfer"] is None
    assert summary["forward_transfer"] == pytest.approx(0.1) and summary["average_accuracy"] == pytest.approx(0.4)
