"""`sharelora eval` end to end as a user runs it: the tiny model, real benchmark data, the results file."""

import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.adapters.adapter_io import save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.cli import main
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.data.synthetic_tasks import write_task
from sharelora_cli.evaluation import gsm8k, mmlu

DOCUMENTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
]
# Completions that fail every HumanEval problem's tests in different ways.
WRONG = ["    return None\n", "    raise NotImplementedError\n", "    return not None\n"]


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The `sharelora` entry point in this process (cheaper than a subprocess): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["sharelora", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def table(stdout: str) -> dict[tuple[str, str], str]:
    """(task, metric) -> printed value, from the terminal table."""
    rows = [line.split() for line in stdout.splitlines()]
    return {(row[0], row[1]): row[2] for row in rows if len(row) == 3 and row[0] != "task"}


def assert_single_error(code: int, stderr: str, *named: str) -> None:
    """Exit 2 and one `error:` line naming each of `named`; the only other stderr is model-loading progress."""
    assert code == 2 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    assert all(text in errors[0] for text in named), errors[0]


def closed_form_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.fixture(scope="module")
def problems(shared_data) -> list[dict]:
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture
def documents(tmp_path) -> Path:
    path = tmp_path / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A saved LoRA adapter whose B factors are nonzero, so it changes the model's outputs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = inject_adapter(model, AdapterConfig(method="lora", rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(adapter, directory, base_model=str(tiny_model_dir))
    return directory


def write_recipe(path: Path, model_dir: Path, output_dir: Path, **eval_section) -> Path:
    path.write_text(
        json.dumps({"model": {"name_or_path": str(model_dir)}, "output_dir": str(output_dir), "eval": eval_section})
    )
    return path


def test_scoring_a_samples_file_prints_and_writes_unbiased_pass_at_k(tmp_path, problems):
    # (task, samples, of which correct): n - c >= k only for HumanEval/1, where pass@10 = 1 - C(11,10)/C(12,10).
    plan = [(problems[0], 10, 7), (problems[1], 12, 1), (problems[2], 10, 0)]
    samples = tmp_path / "samples.jsonl"
    with samples.open("w") as out:
        for problem, n, c in plan:
            for i in range(n):
                completion = problem["canonical_solution"] if i < c else WRONG[i % len(WRONG)]
                out.write(json.dumps({"task_id": problem["task_id"], "completion": completion}) + "\n")
    results = tmp_path / "results.json"
    done = run_cli(
        "eval", "--tasks", "humaneval", "--samples", str(samples), "--allow-code-execution", "--json", str(results)
    )
    assert done.returncode == 0, done.stderr
    expected = {f"pass@{k}": sum(closed_form_pass_at_k(n, c, k) for _, n, c in plan) / 3 for k in (1, 10)}
    assert expected["pass@10"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    document = json.loads(results.read_text())
    assert document["humaneval"] == pytest.approx({**expected, "num_tasks": 3, "num_samples": 32}, abs=1e-12)
    printed = table(done.stdout)
    assert {key: printed[("humaneval", key)] for key in expected} == {
        key: f"{value:.4f}" for key, value in expected.items()
    }
    records = document["records"]["humaneval"]
    assert [r["passed"] for r in records] == [i < c for _, n, c in plan for i in range(n)]
    assert document["config"]["samples_file"] == str(samples) and document["config"]["model"] is None


def test_humaneval_refuses_without_allow_code_execution(tmp_path, problems, monkeypatch, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": problems[0]["canonical_solution"]}) + "\n")
    results = tmp_path / "results.json"
    args = ["eval", "--tasks", "humaneval", "--samples", str(samples), "--json", str(results)]
    code, _, stderr = run_main(monkeypatch, capsys, *args)
    assert_single_error(code, stderr, "--allow-code-execution")
    assert not results.exists()


def test_eval_writes_per_task_metrics_records_and_config(
    tmp_path, tiny_model_dir, shared_data, documents, monkeypatch, capsys
):
    # The recipe only narrows what the flags leave open (two MMLU subjects, short GSM8K generations).
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "elsewhere", tmp_path / "run",
                          gsm8k={"max_new_tokens": 24}, mmlu={"subjects": ["anatomy", "sociology"]})  # fmt: skip
    results = tmp_path / "results.json"
    code, stdout, stderr = run_main(
        monkeypatch, capsys, "eval", str(recipe), "--no-adapter", "--model", str(tiny_model_dir),
        "--tasks", "gsm8k,mmlu,perplexity", "--limit", "2", "--data", str(documents), "--json", str(results),
    )  # fmt: skip
    assert code == 0, stderr
    document = json.loads(results.read_text())
    records = document["records"]
    config = document["config"]
    assert config["model"] == str(tiny_model_dir) and config["adapter"] is None and config["recipe"] == str(recipe)
    assert config["eval"]["limit"] == 2 and config["eval"]["tasks"] == ["gsm8k", "mmlu", "perplexity"]
    assert set(config["seconds"]) == {"gsm8k", "mmlu", "perplexity"}

    references = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]]
    assert len(records["gsm8k"]) == document["gsm8k"]["num_samples"] == 2
    for record, reference in zip(records["gsm8k"], references):
        assert record["prompt"].endswith(gsm8k.format_question(reference["question"]))
        assert record["target"] == gsm8k.normalize(reference["answer"])
        for metric in ("strict-match", "flexible-extract"):
            answer = gsm8k.extract(record["output"], metric)
            assert record[metric] == {"extracted": answer, "correct": gsm8k.normalize(answer) == record["target"]}
        strict, flexible = record["strict-match"]["extracted"], record["flexible-extract"]["extracted"]
        assert record["extracted"] == (
            strict if strict != "[invalid]" else None if flexible == "[invalid]" else flexible
        )
        assert record["correct"] == (
            record["extracted"] is not None and gsm8k.normalize(record["extracted"]) == record["target"]
        )
    for metric in ("strict-match", "flexible-extract"):
        assert document["gsm8k"][metric] == sum(r[metric]["correct"] for r in records["gsm8k"]) / 2
    assert document["gsm8k"]["exact_match"] == sum(r["correct"] for r in records["gsm8k"]) / 2

    assert [r["subject"] for r in records["mmlu"]] == ["anatomy"] * 2 + ["sociology"] * 2
    for record in records["mmlu"]:
        assert record["extracted"] == mmlu.LETTERS[max(range(4), key=record["logprobs"].__getitem__)]
        assert record["correct"] == (record["extracted"] == record["target"])
    metrics = document["mmlu"]
    assert metrics["acc_micro"] == sum(r["correct"] for r in records["mmlu"]) / 4
    per_subject = [metrics["subject/anatomy"], metrics["subject/sociology"]]
    assert per_subject == [sum(r["correct"] for r in records["mmlu"][i : i + 2]) / 2 for i in (0, 2)]
    assert metrics["acc_macro"] == sum(per_subject) / 2
    assert metrics["category/stem"] == metrics["subject/anatomy"]

    ppl = document["perplexity"]
    assert ppl["num_documents"] == 2 and ppl["num_tokens"] == sum(r["tokens"] for r in records["perplexity"])
    assert ppl["token_perplexity"] == pytest.approx(
        math.exp(sum(r["nll"] for r in records["perplexity"]) / ppl["num_tokens"])
    )

    printed = table(stdout)
    assert printed[("mmlu", "acc_micro")] == f"{metrics['acc_micro']:.4f}"
    assert printed[("perplexity", "token_perplexity")] == f"{ppl['token_perplexity']:.4f}"
    assert printed[("gsm8k", "num_samples")] == "2"


def model_perplexities(model_dir: Path, adapter: Path | None) -> list[float]:
    """exp(mean next-token loss) of each document, straight from the model (plus adapter)."""
    from sharelora_cli.adapters.adapter_io import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        load_adapter(model, adapter)
    perplexities = []
    with torch.no_grad():
        for text in DOCUMENTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            perplexities.append(math.exp(model(input_ids=ids, labels=ids).loss.item()))
    return perplexities


def test_adapter_is_loaded_recorded_and_changes_perplexity(
    tmp_path, tiny_model_dir, adapter_dir, documents, monkeypatch, capsys
):
    per_document = {}
    for name, extra in (("base", []), ("adapted", ["--adapter", str(adapter_dir)])):
        results = tmp_path / f"{name}.json"
        code, _, stderr = run_main(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--tasks", "perplexity",
                                   "--data", str(documents), "--json", str(results), *extra)  # fmt: skip
        assert code == 0, stderr
        document = json.loads(results.read_text())
        assert document["config"]["adapter"] == (str(adapter_dir) if extra else None)
        per_document[name] = [record["perplexity"] for record in document["records"]["perplexity"]]
    assert per_document["base"] == pytest.approx(model_perplexities(tiny_model_dir, None), rel=1e-4)
    assert per_document["adapted"] == pytest.approx(model_perplexities(tiny_model_dir, adapter_dir), rel=1e-4)
    # The random base model is close to uniform over its vocabulary, so the adapter moves perplexity by percents.
    assert all(abs(math.log(a / b)) > 1e-2 for a, b in zip(per_document["adapted"], per_document["base"]))


def test_recipe_eval_section_and_output_dir_adapter(
    tmp_path, tiny_model_dir, adapter_dir, documents, monkeypatch, capsys
):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, run, tasks=["mmlu", "perplexity"], limit=1,
                          mmlu={"subjects": ["virology"], "num_fewshot": 2}, perplexity={"path": str(documents)})  # fmt: skip
    code, _, stderr = run_main(monkeypatch, capsys, "eval", str(recipe))
    assert_single_error(code, stderr, str(run / "adapter"), "sharelora train")

    (run / "adapter").mkdir(parents=True)
    for file in adapter_dir.iterdir():
        (run / "adapter" / file.name).write_bytes(file.read_bytes())
    code, stdout, stderr = run_main(monkeypatch, capsys, "eval", str(recipe), "eval.mmlu.num_fewshot=1")
    assert code == 0, stderr
    assert f"results written to {run / 'eval.json'}" in stdout
    document = json.loads((run / "eval.json").read_text())
    assert set(document) == {"mmlu", "perplexity", "records", "config"}
    assert document["config"]["adapter"] == str(run / "adapter")
    assert document["config"]["eval"]["mmlu"]["num_fewshot"] == 1  # the override beat the recipe's 2
    assert document["mmlu"]["num_samples"] == 1 and document["perplexity"]["num_documents"] == 1
    prompt = document["records"]["mmlu"][0]["prompt"]
    assert prompt.count("\nAnswer:") == 2  # one shot, then the question
    adapted = model_perplexities(tiny_model_dir, adapter_dir)[0]
    assert document["records"]["perplexity"][0]["perplexity"] == pytest.approx(adapted, rel=1e-4)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--tasks", "gsm8k,arc"], ["eval.tasks", "arc"]),
        (["--tasks", "perplexity", "--adapter", "{tmp}/no-adapter"], ["no-adapter/sharelora_config.json", "--adapter"]),
        (["--tasks", "perplexity", "--data", "{tmp}/missing.jsonl"], ["missing.jsonl", "not found"]),
        (["--tasks", "perplexity"], ["--data"]),
        (["--tasks", "humaneval", "--samples", "{tmp}/missing.jsonl", "--allow-code-execution"], ["missing.jsonl"]),
        (["--tasks", "mmlu", "--samples", "{tmp}/missing.jsonl"], ["--samples", "humaneval"]),
        (["--tasks", "perplexity", "--gsm8k-path", "{tmp}"], ["--gsm8k-path", "gsm8k"]),
        (["--tasks", "gsm8k", "--gsm8k-path", "{tmp}/no-task"], ["no-task/train.jsonl", "not found"]),
    ],
)
def test_bad_inputs_are_one_line_errors(args, named, tmp_path, tiny_model_dir, monkeypatch, capsys):
    args = [arg.format(tmp=tmp_path) for arg in args]
    code, _, stderr = run_main(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), *args)
    assert_single_error(code, stderr, *[text.format(tmp=tmp_path) for text in named])


def test_gsm8k_path_scores_other_problems_in_gsm8k_format(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """--gsm8k-path DIR: test.jsonl is scored, the shots come from train.jsonl (as GSM8K's own folder)."""
    task = write_task(tmp_path / "story", "story", train_size=3, test_size=4, seed=0)
    results = tmp_path / "results.json"
    code, _, stderr = run_main(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k",
                               "--gsm8k-path", str(task), "--num-fewshot", "3", "--json", str(results))  # fmt: skip
    assert code == 0, stderr
    document = json.loads(results.read_text())
    shots = gsm8k.load_split(str(task), "train")
    tests = gsm8k.load_split(str(task), "test")
    assert document["gsm8k"]["num_samples"] == 4 and document["config"]["eval"]["gsm8k"]["path"] == str(task)
    for record, row in zip(document["records"]["gsm8k"], tests):
        assert record["prompt"] == gsm8k.build_prompt(row["question"], shots)
        assert record["target"] == row["answer"].rsplit("#### ", 1)[1]


def test_missing_benchmark_data_is_a_one_line_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("SHARELORA_DATA", str(tmp_path / "no-data"))
    code, _, stderr = run_main(
        monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--limit", "1"
    )
    assert_single_error(code, stderr, str(tmp_path / "no-data" / "gsm8k" / "train.jsonl"), "SHARELORA_DATA")
