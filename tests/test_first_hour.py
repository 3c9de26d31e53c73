"""A new user's first hour through the CLI: own recipe, readable runs, resuming a finished run."""

import json
import re

import pytest
import torch
from cli_runner import assert_one_line_error, run_cli
from test_train import read_metrics, write_recipe
from transformers import get_cosine_schedule_with_warmup

RUN_FILES = (
    "summary.json",
    "metrics.jsonl",
    "recipe.yaml",
    "adapter/adapter.safetensors",
    "adapter/sharelora_config.json",
)
STEP_LINE = re.compile(
    r"^step (\d+)/6  loss (\d+\.\d{4})  lr (\S+)  tok/s \d+  epoch \d+\.\d\d(  val_loss (\d+\.\d{4}))?$"
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A 6-step run through the CLI, output captured (no terminal): its newest checkpoint is step 4, not 6."""
    tmp = tmp_path_factory.mktemp("first-hour")
    train = {"max_steps": 6, "log_every": 2, "eval_every": 3, "checkpoint_every": 4, "warmup_steps": 2}
    recipe = write_recipe(tmp, tiny_model_dir, train=train)
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr
    return recipe, tmp / "run", result


def test_resuming_a_finished_run_says_so_in_one_line_and_changes_no_file(finished_run):
    recipe, run, _ = finished_run
    before = {name: (run / name).read_bytes() for name in RUN_FILES}
    result = run_cli("train", str(recipe), "resume=true")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        f"{run} already finished at step 6 (train.max_steps=6); nothing to do: raise train.max_steps to train "
        "further, or choose another output_dir"
    ]
    assert {name: (run / name).read_bytes() for name in RUN_FILES} == before
    json.loads((run / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN


def test_a_run_without_a_terminal_logs_one_plain_line_per_logged_step(finished_run):
    _, run, result = finished_run
    lines = [STEP_LINE.match(line) for line in result.stderr.splitlines() if line.startswith("step ")]
    assert all(lines) and "\r" not in result.stderr
    metrics = {m["step"]: m for m in read_metrics(run)}
    # log_every=2 and the validations at steps 3 and 6: the lines are metrics.jsonl's records, rounded.
    assert [int(m[1]) for m in lines] == sorted(metrics) == [2, 3, 4, 6]
    for match in lines:
        record = metrics[int(match[1])]
        assert match[2] == f"{record['loss']:.4f}" and match[3] == f"{record['lr']:.2e}"
        assert match[5] == (f"{record['val_loss']:.4f}" if "val_loss" in record else None)


def test_done_line_rounds_the_losses_and_shows_no_none_or_nan(finished_run):
    _, run, result = finished_run
    done = result.stdout.strip().splitlines()[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert done.startswith("done: 6 steps") and "None" not in done and "nan" not in done
    assert f"final loss {summary['final_loss']:.4f}, validation loss {summary['final_val_loss']:.4f};" in done


def test_logged_lr_is_the_rate_applied_at_that_step_as_transformers_applies_it(finished_run):
    _, run, _ = finished_run
    # transformers.Trainer's scheduler, stepped after each update: the rate step k applies is the one before it.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=6)
    applied = []
    for _ in range(6):
        applied.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    logged = {m["step"]: m["lr"] for m in read_metrics(run)}
    assert logged == {step: applied[step - 1] for step in logged}
    assert applied[0] == 0.0  # warm-up starts from zero: step 1 trains nothing


def test_a_recipe_without_a_model_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("adapter: {method: sharea}\n")
    assert_one_line_error(run_cli("train", str(path)), "model.name_or_path is required", str(path))


def test_the_default_output_dir_is_runs_slash_the_recipe_name(tmp_path, tiny_model_dir):
    path = tmp_path / "my-alpaca.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}}))
    result = run_cli("show", str(path))
    assert result.returncode == 0, result.stderr
    assert "output_dir: runs/my-alpaca\n" in result.stdout


def test_shipped_recipes_keep_their_model_and_output_dir():
    result = run_cli("show", "quickstart")
    assert "name_or_path: artifacts/tiny-llama-arith" in result.stdout
    assert "output_dir: runs/quickstart\n" in result.stdout


def gsm8k_lengths(tiny_model_dir, shared_data, rows: int) -> list[int]:
    """Tokens of each of the first GSM8K rows as trained (prompt, answer, eos), counted apart from sharelora."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:rows]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in map(json.loads, lines)]
    return [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]


def test_the_data_line_says_what_the_rows_became_and_the_epochs(finished_run, tiny_model_dir, shared_data):
    _, _, result = finished_run
    long = [n for n in gsm8k_lengths(tiny_model_dir, shared_data, 300) if n > 256]
    kept = 300 - len(long)
    validation = int(kept * 0.1)
    train = kept - validation
    expected = (
        f"data: 300 rows from {shared_data / 'gsm8k' / 'train.jsonl'} -> {kept} examples ({len(long)} dropped: longer "
        f"than data.max_length=256, {min(long)}-{max(long)} tokens); {train} train / {validation} validation; "
        f"6 steps x 4 examples = {24 / train:.2f} epochs"
    )
    assert long and expected in result.stdout.splitlines()


def test_num_epochs_sets_the_steps_and_a_finished_epoch_run_is_not_resumed(tmp_path, tiny_model_dir, shared_data):
    data = {"max_examples": 40, "validation_fraction": 0, "max_length": 512}
    recipe = write_recipe(tmp_path, tiny_model_dir, data=data, train={"num_epochs": 0.5, "eval_every": 100})
    assert all(n <= 512 for n in gsm8k_lengths(tiny_model_dir, shared_data, 40))
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "; 5 steps x 4 examples = 0.50 epochs" in result.stdout  # ceil(0.5 x 40 / 4)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 5
    again = run_cli("train", str(recipe), "resume=true")
    assert again.returncode == 0 and "already finished at step 5 (train.num_epochs=0.5)" in again.stdout


def test_overlength_messages_give_the_counts_and_token_lengths(tmp_path, tiny_model_dir, shared_data):
    lengths = gsm8k_lengths(tiny_model_dir, shared_data, 50)
    data = {"max_examples": 50, "validation_fraction": 0, "max_length": 40, "overlength": "drop"}
    recipe = write_recipe(tmp_path, tiny_model_dir, data=data)
    assert_one_line_error(
        run_cli("train", str(recipe)),
        f"no example fits data.max_length=40: 50 of 50 rows dropped as longer ({min(lengths)}-{max(lengths)} tokens)",
    )
    limit = sorted(lengths)[2]  # three rows fit, fewer than a batch of 4
    fit = sum(n <= limit for n in lengths)
    long = [n for n in lengths if n > limit]
    assert fit < 4
    assert_one_line_error(
        run_cli("train", str(recipe), f"data.max_length={limit}"),
        f"exceeds the {fit} training examples",
        f"(of 50 rows: {len(long)} dropped: longer than data.max_length={limit}, {min(long)}-{max(long)} tokens)",
    )


def test_an_override_typo_is_reported_against_the_override_with_the_near_key():
    line = assert_one_line_error(run_cli("show", "quickstart", "adapter.rnak=8"))
    assert line.startswith("error: override 'adapter.rnak=8': unknown key 'adapter.rnak'; did you mean 'adapter.rank'?")
    assert "quickstart.yaml" not in line


def test_a_typo_in_the_recipe_file_gets_the_near_key_too(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {name_or_path: llama-7b}\ntrain: {max_stpes: 5}\n")
    assert_one_line_error(run_cli("show", str(path)), "unknown key 'train.max_stpes'; did you mean 'train.max_steps'?")


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": "d"\n')
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"path": str(data)})
    assert_one_line_error(run_cli("train", str(recipe)), f"{data}:3: not valid JSON", "fix or remove that line")


def test_alpaca_rows_read_as_gsm8k_suggest_the_format_and_count_rows_from_one(tmp_path, tiny_model_dir):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"instruction": "Add 2 and 3.", "input": "", "output": "5"}) + "\n")
    recipe = write_recipe(tmp_path, tiny_model_dir, data={"path": str(data)})
    assert_one_line_error(
        run_cli("train", str(recipe)), "row 1 has no field 'question'", "its fields fit data.format=alpaca"
    )


def test_an_offline_hub_id_says_what_to_do(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    result = run_cli("train", str(recipe), "model.name_or_path=no-such-org/no-such-model")
    assert_one_line_error(
        result, "'no-such-org/no-such-model'", "HF_HUB_OFFLINE is set", "give a local model directory"
    )


@pytest.mark.parametrize("inside", ["", "checkpoint-4"])
def test_a_run_or_checkpoint_given_as_adapter_suggests_its_adapter_folder(finished_run, tmp_path, inside):
    _, run, _ = finished_run
    given = run / inside if inside else run
    merge = run_cli("merge", "--adapter", str(given), "--out", str(tmp_path / "merged"))
    assert_one_line_error(merge, f"use --adapter {given / 'adapter'}")
    evaluate = run_cli("eval", "--model", "llama-7b", "--adapter", str(given), "--tasks", "gsm8k")
    assert_one_line_error(evaluate, f"use --adapter {given / 'adapter'}")
