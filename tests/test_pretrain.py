"""The pretrained tiny base: the same seed gives the same weights, pretraining learns, and a short fine-tune
on the base teaches a held-back skill, measured by `sharelora eval` on held-out problems."""

import json
import math
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from single_thread import single_thread
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from sharelora_cli.cli import main
from sharelora_cli.config.recipe import DataConfig, load_recipe
from sharelora_cli.data.examples import build_splits
from sharelora_cli.data.synthetic_tasks import PRETRAINING_MIX, rows, write_task
from sharelora_cli.models.pretrain import SUMMARY_FILE, PretrainConfig, pretrain, tokenize
from sharelora_cli.training.loop import train

# The GSM8K evaluator's strict metric: the number after "#### " equals the reference's.
ACCURACY = "strict-match"
# Seconds on 2 cores: a model of ~30k parameters, a few steps.
TINY = {"steps": 4, "batch_size": 8, "hidden": 32, "layers": 2, "vocab_size": 300, "warmup_steps": 1}
# A base that knows one skill, `compare` (the larger of two numbers), well: under a minute on 2 cores.
COMPARE_BASE = PretrainConfig(
    seed=0, mix={"compare": 1.0}, steps=250, batch_size=32, hidden=128, layers=2, warmup_steps=10
)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def compare_base(tmp_path_factory) -> Path:
    with single_thread():
        return pretrain(tmp_path_factory.mktemp("bases") / "compare", COMPARE_BASE)


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    first, again, other = (
        pretrain(tmp_path / name, PretrainConfig(seed=seed, **TINY)) for name, seed in (("a", 3), ("b", 3), ("c", 4))
    )
    a, b, c = weights(first), weights(again), weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretraining_text_is_what_sharelora_train_feeds_the_model(tmp_path, compare_base):
    """Pretraining tokenizes in one batch; the result must equal data.py's gsm8k format, question and answer."""
    tokenizer = AutoTokenizer.from_pretrained(compare_base)
    corpus = rows(PRETRAINING_MIX, 50, seed=1)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in corpus))
    expected = build_splits(
        DataConfig(path=str(path), mask_prompt=False, validation_fraction=0.0), tokenizer, seed=0
    ).train
    # This base's tokenizer never saw the stories, so they take more tokens than a pretraining row may.
    ours = tokenize(corpus, tokenizer, replace(COMPARE_BASE, max_length=512))
    assert [ex.input_ids for ex in ours] == [ex.input_ids for ex in sorted(expected, key=lambda ex: ex.row)]
    assert all(ex.labels == ex.input_ids for ex in ours)


def test_pretraining_trains_every_weight_and_saves_a_loadable_checkpoint(compare_base):
    summary = json.loads((compare_base / SUMMARY_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(compare_base)
    # Random init predicts about uniformly over the vocabulary. After training only the two random numbers
    # of each question are unpredictable, ln(31 * 30) = 6.8 nats spread over its ~20 tokens.
    vocab = model.config.vocab_size
    assert summary["first_loss"] == pytest.approx(math.log(vocab), rel=0.1)
    assert summary["final_loss"] < 1.0
    torch.manual_seed(COMPARE_BASE.seed)  # the initial weights pretrain() started from
    initial = dict(LlamaForCausalLM(model.config).named_parameters())
    assert [name for name, param in model.named_parameters() if torch.equal(param, initial[name])] == []
    assert summary["parameters"] == model.num_parameters()


def test_tokenizer_reads_every_digit_as_its_own_token(compare_base):
    tokenizer = AutoTokenizer.from_pretrained(compare_base)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("What is 12+305?", add_special_tokens=False)["input_ids"])
    assert [t for t in tokens if any(ch.isdigit() for ch in t)] == ["1", "2", "3", "0", "5"]
    text = "Mia has 17 pens. She buys 5 more.\n#### 22"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def run_main(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["sharelora", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)


def test_short_fine_tune_teaches_the_held_back_skill(compare_base, tmp_path, monkeypatch):
    """ShareA, 80 steps: `smaller` goes from what a compare-only base gets by accident to most problems right."""
    task = write_task(tmp_path / "smaller", "smaller", train_size=400, test_size=100, seed=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(compare_base)},
        "adapter": {"method": "sharea", "rank": 8, "alpha": 16.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"path": str(task / "train.jsonl"), "max_length": 64, "validation_fraction": 0.0},
        "train": {"max_steps": 80, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "log_every": 80, "eval_every": 80, "checkpoint_every": 80},
        "eval": {"tasks": ["gsm8k"], "batch_size": 50, "gsm8k": {"path": str(task), "num_fewshot": 0, "max_new_tokens": 16}},
        "output_dir": str(tmp_path / "run"),
    }))  # fmt: skip
    with single_thread():
        run_main(monkeypatch, "eval", str(recipe), "--no-adapter", "--json", str(tmp_path / "before.json"))
        train(load_recipe(str(recipe)))
        run_main(monkeypatch, "eval", str(recipe), "--json", str(tmp_path / "after.json"))
    before, after = (json.loads((tmp_path / name).read_text())["gsm8k"] for name in ("before.json", "after.json"))
    assert before["num_samples"] == after["num_samples"] == 100
    # The base answers with the larger number, right only when it slips (6% measured); trained, it was right on
    # half (50%). On 100 problems one standard error is at most 5 points, so these bounds leave 4 of them.
    assert before[ACCURACY] <= 0.25
    assert after[ACCURACY] >= before[ACCURACY] + 0.25


def run_script(monkeypatch, *args: str) -> None:
    script = Path(__file__).parents[1] / "scripts" / "make_tiny_model.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--layers", "0"), ("--hidden", "-8"), ("--hidden", "36")])
def test_script_refuses_a_bad_size(tmp_path, monkeypatch, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        run_script(monkeypatch, "--pretrain", str(tmp_path / "m"), flag, value)
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and flag in errors[-1] and errors[-1].startswith("make_tiny_model.py: error:")
    assert not (tmp_path / "m").exists()


def test_script_builds_a_deeper_base_with_layers(tmp_path, monkeypatch):
    """--layers and --hidden reach the saved model; the default depth stays the 3 layers of the quickstart's base."""
    with single_thread():
        run_script(
            monkeypatch, "--pretrain", str(tmp_path / "deep"), "--tasks", str(tmp_path / "tasks"),
            "--steps", "1", "--layers", "5", "--hidden", "32",
        )  # fmt: skip
    config = json.loads((tmp_path / "deep" / "config.json").read_text())
    summary = json.loads((tmp_path / "deep" / SUMMARY_FILE).read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (5, 32)
    assert (summary["config"]["layers"], summary["config"]["hidden"]) == (5, 32)
    assert PretrainConfig().layers == 3
