"""The basics a user reaches for in the first hour: --version, -h, methods, train --dry-run, generate."""

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import typer
from cli_runner import assert_one_line_error, run_cli
from test_train import write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.adapters import registry
from sharelora_cli.adapters.base import Method
from sharelora_cli.adapters.catalog import method_entries
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.adapters.size_knobs import knob_of, with_knob
from sharelora_cli.cli import app
from sharelora_cli.config.recipe import validate

QUESTION = "Tom has 3 boxes of 12 pens. He gives away 5 pens. How many pens does he have left?"


def test_version_prints_the_installed_package_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"sharelora {version('sharelora')}\n"


def test_dash_h_is_help_on_the_top_level_and_on_every_command():
    commands = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"train", "eval", "methods", "generate"} <= set(commands)
    for args in ([], *([name] for name in commands)):
        short, long = run_cli(*args, "-h"), run_cli(*args, "--help")
        assert short.returncode == long.returncode == 0, short.stderr
        assert short.stdout == long.stdout
        assert "Usage: sharelora" in short.stdout


def test_methods_lists_every_registered_method_in_one_line_with_its_size_key():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["method", "size", "key", "what", "it", "shares", "or", "trains"]
    assert [line.split()[0] for line in lines] == list(registry.METHODS)
    for line, (name, method) in zip(lines, registry.METHODS.items()):
        assert line.split()[1] == f"adapter.{knob_of(name).path}"
        assert line.endswith(method.summary) and method.summary
    assert lines[list(registry.METHODS).index("vblora")].split()[1] == "adapter.vblora.num_vectors"


def test_methods_json_names_keys_that_set_the_recipe(tmp_path):
    result = run_cli("methods", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert [entry["method"] for entry in entries] == list(registry.METHODS)
    for entry in entries:
        # The size key is a real recipe key: setting it through its path changes that value and no other.
        path = entry["size_key"].removeprefix("adapter.")
        adapter = validate({"adapter": with_knob({"method": entry["method"]}, knob_of(entry["method"]), 7)}).adapter
        value = adapter.model_dump()
        for part in path.split("."):
            value = value[part]
        assert value == 7
        if entry["settings_key"] is not None:
            assert entry["settings_key"].removeprefix("adapter.") in adapter.model_dump()


def test_a_newly_registered_method_is_listed_without_touching_the_command(monkeypatch):
    extra = Method("my-lora", LoraLayer, summary="a method added in one line of the registry")
    monkeypatch.setitem(registry.METHODS, "my-lora", extra)
    entries = {entry.method: entry for entry in method_entries()}
    assert entries["my-lora"].summary == extra.summary and entries["my-lora"].size_key == "adapter.rank"


@pytest.fixture(scope="module")
def tokenizer_only_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model's directory without its weights: what a dry run may read, and train cannot."""
    target = tmp_path_factory.mktemp("tokenizer-only") / "model"
    shutil.copytree(tiny_model_dir, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


def gsm8k_row(shared_data: Path, number: int) -> dict:
    """Row `number` (counted from 1) of the GSM8K training file."""
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()
    return json.loads(lines[number - 1])


def test_dry_run_prints_recipe_data_line_and_a_marked_example_without_weights_or_writes(
    tmp_path, tokenizer_only_model, shared_data
):
    recipe = write_recipe(tmp_path, tokenizer_only_model)
    overrides = ("train.batch_size=2", "data.max_examples=60")
    result = run_cli("train", str(recipe), "--dry-run", *overrides)
    assert result.returncode == 0, result.stderr
    shown = run_cli("show", str(recipe), *overrides).stdout
    assert result.stdout.startswith(shown)
    data, header, *text = result.stdout[len(shown) :].splitlines()
    assert data.startswith("data: 60 rows from ") and "; 12 steps x 2 examples = " in data
    assert header.startswith("example (data row ") and header.endswith(", marked [[ ... ]]")
    number = int(header.removeprefix("example (data row ").split(",")[0])
    row = gsm8k_row(shared_data, number)
    # bos, the prompt, then the answer and eos: the trained tokens, the space before the answer included.
    assert "\n".join(text) == f"<s>Question: {row['question']}\nAnswer:[[ {row['answer']}</s>]]"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_only_model)
    trained = len(tokenizer(f" {row['answer']}", add_special_tokens=False)["input_ids"]) + 1
    total = len(tokenizer(f"Question: {row['question']}\nAnswer: {row['answer']}")["input_ids"]) + 1
    assert f"): {trained} of {total} tokens trained," in header
    assert not (tmp_path / "run").exists()  # output_dir: not created, not locked
    # The same recipe really trained needs the weights the dry run never read.
    assert_one_line_error(run_cli("train", str(recipe), *overrides), "model.name_or_path", "cannot load a model")


def test_dry_run_prints_the_data_line_train_prints(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, train={"max_steps": 2, "eval_every": 2, "checkpoint_every": 2})
    dry = run_cli("train", str(recipe), "--dry-run")
    trained = run_cli("train", str(recipe))
    assert dry.returncode == trained.returncode == 0, dry.stderr + trained.stderr
    data_lines = [line for line in trained.stdout.splitlines() if line.startswith("data: ")]
    assert len(data_lines) == 1 and data_lines[0] in dry.stdout.splitlines()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.format=alpaca"], "row 1 has no field 'instruction'"),
        (["adapter.rnak=8"], "did you mean 'adapter.rank'"),
        (["train.batch_size=300"], "exceeds the"),
    ],
)
def test_dry_run_refuses_a_bad_recipe_with_the_line_train_gives(tmp_path, tokenizer_only_model, overrides, named):
    recipe = write_recipe(tmp_path, tokenizer_only_model)
    line = assert_one_line_error(run_cli("train", str(recipe), "--dry-run", *overrides), named)
    assert assert_one_line_error(run_cli("train", str(recipe), *overrides), named) == line


def test_dry_run_refuses_an_output_dir_holding_a_run_as_train_does(tmp_path, tokenizer_only_model):
    recipe = write_recipe(tmp_path, tokenizer_only_model)
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    line = assert_one_line_error(run_cli("train", str(recipe), "--dry-run"), "already holds a finished run")
    assert assert_one_line_error(run_cli("train", str(recipe)), "already holds a finished run") == line


def test_dry_run_of_a_staged_recipe_shows_each_stage_data_and_example(tmp_path, tokenizer_only_model):
    stages = [{"name": "first", "data": {"max_examples": 40}}, {"data": {"max_examples": 20}}]
    recipe = write_recipe(tmp_path, tokenizer_only_model, stages=stages)
    result = run_cli("train", str(recipe), "--dry-run")
    assert result.returncode == 0, result.stderr
    tail = result.stdout.splitlines()
    starts = [tail.index("first:"), tail.index("stage-2:")]
    for start, rows in zip(starts, (40, 20)):
        assert tail[start + 1].startswith(f"data: {rows} rows from ")
        assert tail[start + 2].startswith("example (data row ")
    assert not (tmp_path / "run").exists()


def write_rows(path: Path, fmt: str, shared_data: Path, count: int) -> Path:
    """GSM8K training rows rewritten in data.format `fmt`."""
    rows = [gsm8k_row(shared_data, n) for n in range(1, count + 1)]
    as_format = {
        "gsm8k": lambda r: r,
        "alpaca": lambda r: {"instruction": r["question"], "input": "", "output": r["answer"]},
        "chat": lambda r: {
            "messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        },
    }[fmt]
    path.write_text("".join(json.dumps(as_format(row)) + "\n" for row in rows))
    return path


def expected_prompt_ids(tokenizer, fmt: str) -> list[int]:
    """The prompt part of a training example of that format, written out here apart from sharelora."""
    if fmt == "chat":  # the template writes its own special tokens
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = {"gsm8k": f"Question: {QUESTION}\nAnswer:", "alpaca": f"### Instruction:\n{QUESTION}\n\n### Response:\n"}
    return tokenizer(text[fmt])["input_ids"]


@pytest.fixture(scope="module", params=["gsm8k", "alpaca", "chat"])
def trained_run(request, tmp_path_factory, tiny_model_dir, shared_data):
    """A few steps of ShareA on the tiny model, on GSM8K rows written in each data format, through the CLI."""
    tmp = tmp_path_factory.mktemp(f"generate-{request.param}")
    data = {"path": str(write_rows(tmp / "data.jsonl", request.param, shared_data, 40)), "format": request.param}
    train = {"max_steps": 8, "lr": 1e-2, "eval_every": 8, "checkpoint_every": 8}
    recipe = write_recipe(tmp, tiny_model_dir, data=data, train=train)
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr
    return request.param, tmp / "run" / "adapter"


def greedy_ids(model_dir: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decode of the prompt, on the base with the saved adapter loaded."""
    from sharelora_cli.adapters.adapter_io import load_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.inference_mode():
        output = model.eval().generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return output[0, len(prompt_ids) :].tolist()


def generate_json(*args: str) -> dict:
    result = run_cli("generate", "--prompt", QUESTION, "--max-new-tokens", "12", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_is_the_greedy_decode_of_the_prompt_in_the_training_format(trained_run, tiny_model_dir):
    fmt, adapter = trained_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = expected_prompt_ids(tokenizer, fmt)
    with_adapter = generate_json("--adapter", str(adapter))  # the base comes from the adapter's record
    assert with_adapter["prompt_ids"] == prompt_ids
    assert with_adapter["completion_ids"] == greedy_ids(tiny_model_dir, adapter, prompt_ids, 12)
    assert with_adapter["completion"] == tokenizer.decode(with_adapter["completion_ids"], skip_special_tokens=True)
    base = generate_json("--adapter", str(adapter), "--no-adapter")
    assert base["prompt_ids"] == prompt_ids
    assert base["completion_ids"] == greedy_ids(tiny_model_dir, None, prompt_ids, 12)
    assert base["completion_ids"] != with_adapter["completion_ids"]  # the adapter was applied


@pytest.mark.parametrize("trained_run", ["gsm8k"], indirect=True)
def test_generate_prints_the_completion_alone_and_raw_sends_the_prompt_as_is(trained_run, tiny_model_dir):
    fmt, adapter = trained_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = run_cli("generate", "--adapter", str(adapter), "--prompt", QUESTION, "--max-new-tokens", "12")
    assert plain.returncode == 0, plain.stderr
    expected = greedy_ids(tiny_model_dir, adapter, expected_prompt_ids(tokenizer, fmt), 12)
    assert plain.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    raw = generate_json("--adapter", str(adapter), "--raw", "--model", str(tiny_model_dir))
    assert raw["prompt"] == QUESTION and raw["prompt_ids"] == tokenizer(QUESTION)["input_ids"]
    assert raw["completion_ids"] == greedy_ids(tiny_model_dir, adapter, raw["prompt_ids"], 12)


def test_generate_refuses_a_run_directory_and_a_missing_adapter_in_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "sharelora_config.json").write_text("{}")
    assert_one_line_error(
        run_cli("generate", "--adapter", str(run), "--prompt", "hi"), f"use --adapter {run / 'adapter'}"
    )
    missing = tmp_path / "nowhere"
    assert_one_line_error(run_cli("generate", "--adapter", str(missing), "--prompt", "hi"), str(missing), "not found")
    assert_one_line_error(run_cli("generate", "--prompt", "hi"), "--adapter", "--model")
    assert_one_line_error(
        run_cli("generate", "--model", str(missing), "--prompt", "hi"), f"--model: directory '{missing}' does not exist"
    )


def test_generate_refuses_bad_numbers_in_one_line(tmp_path):
    assert_one_line_error(
        run_cli("generate", "--model", "x", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens", "got 0"
    )
    assert_one_line_error(run_cli("generate", "--model", "x", "--prompt", "hi", "--top-p", "1.5"), "--top-p")


@pytest.mark.parametrize("trained_run", ["alpaca"], indirect=True)
def test_generate_reads_an_older_adapter_format_from_its_run_recipe(trained_run, tiny_model_dir, tmp_path):
    _, adapter = trained_run
    run = tmp_path / "older-run"
    shutil.copytree(adapter.parent, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    config_file = run / "adapter" / "sharelora_config.json"
    config = json.loads(config_file.read_text())
    assert config.pop("data_format") == "alpaca"
    config_file.write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    older = generate_json("--adapter", str(run / "adapter"))
    assert older["prompt_ids"] == expected_prompt_ids(tokenizer, "alpaca")
    (run / "recipe.yaml").unlink()
    assert_one_line_error(
        run_cli("generate", "--adapter", str(run / "adapter"), "--prompt", "hi"),
        "records no training data format",
        "--raw",
    )
