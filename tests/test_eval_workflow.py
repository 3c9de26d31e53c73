"""`sharelora eval` in a practitioner's workflow: after `train`, with no recipe, in the format the adapter learnt."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from test_eval_cli import DOCUMENTS, assert_single_error, run_main
from test_train import write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.adapters.adapter_io import CONFIG_FILE, load_adapter, save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, DataConfig, QuantizationConfig
from sharelora_cli.data.examples import ALPACA_PROMPT, IGNORE_INDEX, build_splits
from sharelora_cli.evaluation import gsm8k
from sharelora_cli.evaluation.engine import cut_at_stop
from sharelora_cli.evaluation.progress import TaskProgress
from sharelora_cli.evaluation.prompt_formats import ALPACA_STOP


def gsm8k_rows(shared_data: Path, split: str, count: int) -> list[dict]:
    lines = (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory, tiny_model_dir, shared_data) -> Path:
    """A run trained through the CLI on GSM8K problems written as alpaca rows: RUN/adapter, RUN/recipe.yaml."""
    tmp = tmp_path_factory.mktemp("alpaca")
    rows = [{"instruction": r["question"], "output": r["answer"]} for r in gsm8k_rows(shared_data, "train", 24)]
    data = write_jsonl(tmp / "alpaca.jsonl", rows)
    train = {"max_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 0}
    recipe = write_recipe(tmp, tiny_model_dir, data={"path": str(data), "format": "alpaca"}, train=train)
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr
    return tmp / "run"


@pytest.fixture
def documents(tmp_path) -> Path:
    return write_jsonl(tmp_path / "documents.jsonl", [{"text": text} for text in DOCUMENTS])


def perplexities(path: Path) -> list[float]:
    return [record["perplexity"] for record in json.loads(path.read_text())["records"]["perplexity"]]


def test_adapter_without_model_uses_its_recorded_base_and_the_base_run_keeps_its_own_file(
    alpaca_run, tiny_model_dir, documents, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    adapter = alpaca_run / "adapter"
    args = ["eval", "--adapter", str(adapter), "--tasks", "perplexity", "--data", str(documents)]
    code, stdout, stderr = run_main(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"results written to {alpaca_run / 'eval.json'}"
    config = json.loads((alpaca_run / "eval.json").read_text())["config"]
    assert config["model"] == str(tiny_model_dir) and config["adapter"] == str(adapter)

    code, stdout, stderr = run_main(monkeypatch, capsys, *args, "--no-adapter")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"results written to {alpaca_run / 'eval-base.json'}"
    base = json.loads((alpaca_run / "eval-base.json").read_text())
    assert base["config"]["model"] == str(tiny_model_dir) and base["config"]["adapter"] is None
    # Both files are kept, and they differ: the adapter (trained at lr 3e-3) moved the perplexities.
    adapted, before = perplexities(alpaca_run / "eval.json"), perplexities(alpaca_run / "eval-base.json")
    assert all(a != b for a, b in zip(adapted, before))


def test_help_says_where_results_go_by_default():
    result = run_cli("eval", "--help")
    words = " ".join(word for word in result.stdout.split() if word not in "│╭╮╰╯─")
    assert result.returncode == 0
    assert (
        "results file (default: eval.json with an adapter, eval-base.json without, in the recipe's OUTPUT_DIR or "
        "else beside the --adapter directory; with neither, ./eval-MODEL.json)"
    ) in words


def test_a_bare_model_writes_a_file_named_after_it(tiny_model_dir, documents, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "perplexity", "--data", str(documents)]
    code, stdout, stderr = run_main(monkeypatch, capsys, *args)
    assert code == 0, stderr
    name = f"eval-{tiny_model_dir.name}.json"
    assert stdout.strip().splitlines()[-1] == f"results written to {name}"
    assert json.loads((tmp_path / name).read_text())["perplexity"]["num_documents"] == len(DOCUMENTS)


def test_recipe_evaluated_without_its_adapter_writes_eval_base_json(
    tiny_model_dir, documents, tmp_path, monkeypatch, capsys
):
    recipe = write_recipe(
        tmp_path, tiny_model_dir, eval={"tasks": ["perplexity"], "perplexity": {"path": str(documents)}}
    )
    code, stdout, stderr = run_main(monkeypatch, capsys, "eval", str(recipe), "--no-adapter")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"results written to {tmp_path / 'run' / 'eval-base.json'}"
    assert not (tmp_path / "run" / "eval.json").exists()


def test_base_model_comes_from_the_runs_recipe_when_the_adapter_config_lacks_it(
    alpaca_run, tiny_model_dir, documents, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(alpaca_run / "adapter", run / "adapter")
    shutil.copy(alpaca_run / "recipe.yaml", run / "recipe.yaml")
    config = json.loads((run / "adapter" / CONFIG_FILE).read_text())
    (run / "adapter" / CONFIG_FILE).write_text(json.dumps({**config, "base_model": None}))
    args = ["eval", "--adapter", str(run / "adapter"), "--tasks", "perplexity", "--data", str(documents)]
    code, _, stderr = run_main(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert json.loads((run / "eval.json").read_text())["config"]["model"] == str(tiny_model_dir)

    (run / "recipe.yaml").unlink()
    code, _, stderr = run_main(monkeypatch, capsys, *args)
    assert_single_error(code, stderr, f"--adapter {run / 'adapter'} records no base model", "pass --model")


@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter recorded as trained on the tiny model loaded in 4-bit NF4, as `train` records one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = inject_adapter(model, AdapterConfig(method="lora", rank=4, targets=["q_proj", "v_proj"]))
    nf4 = QuantizationConfig(load_in_4bit=True, compute_dtype="float32").model_dump()
    directory = tmp_path_factory.mktemp("nf4") / "adapter"
    save_adapter(adapter, directory, base_model=str(tiny_model_dir), extra={"quantization": nf4})
    return directory


def test_an_adapter_trained_on_a_4bit_base_is_scored_on_that_base(
    nf4_adapter, tiny_model_dir, documents, tmp_path, monkeypatch, capsys
):
    args = ["eval", "--adapter", str(nf4_adapter), "--tasks", "perplexity", "--data", str(documents)]
    code, _, stderr = run_main(monkeypatch, capsys, *args, "--json", str(tmp_path / "recorded.json"))
    assert code == 0, stderr
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)}, "output_dir": str(tmp_path / "run"),
                                  "quantization": {"load_in_4bit": True, "compute_dtype": "float32"},
                                  "eval": {"adapter": str(nf4_adapter)}}))  # fmt: skip
    code, _, stderr = run_main(
        monkeypatch, capsys, *args[:1], str(recipe), *args[3:], "--json", str(tmp_path / "4bit.json")
    )
    assert code == 0, stderr
    overridden = [*args, "quantization.load_in_4bit=false", "--json", str(tmp_path / "full.json")]
    code, _, stderr = run_main(monkeypatch, capsys, *overridden)
    assert code == 0, stderr
    recorded, in_4bit = perplexities(tmp_path / "recorded.json"), perplexities(tmp_path / "4bit.json")
    assert recorded == in_4bit  # the same weights, the same kernels: the same numbers
    # NF4 rounds every weight to one of 16 levels per block: the full-precision base scores otherwise.
    assert all(a != b for a, b in zip(recorded, perplexities(tmp_path / "full.json")))


def test_overrides_and_shot_flags_work_without_a_recipe_and_zero_shots_need_no_train_split(
    alpaca_run, shared_data, tmp_path, monkeypatch, capsys
):
    # A folder with test.jsonl only: 0-shot never reads a train split.
    folder = tmp_path / "zero-shot"
    tests = write_jsonl(folder / "test.jsonl", gsm8k_rows(shared_data, "test", 2))
    args = ["eval", "--adapter", str(alpaca_run / "adapter"), "--tasks", "gsm8k", "--gsm8k-path", str(folder)]
    code, _, stderr = run_main(monkeypatch, capsys, *args, "eval.gsm8k.num_fewshot=0", "--max-new-tokens", "5")
    assert code == 0, stderr
    document = json.loads((alpaca_run / "eval.json").read_text())
    assert document["config"]["eval"]["gsm8k"] | {"path": None} == {"path": None, "num_fewshot": 0, "max_new_tokens": 5}
    rows = [json.loads(line) for line in tests.read_text().splitlines()]
    assert [r["prompt"] for r in document["records"]["gsm8k"]] == [gsm8k.format_question(r["question"]) for r in rows]

    # --num-fewshot reaches every task with shots; the harness prompt stays the default.
    args = ["eval", "--adapter", str(alpaca_run / "adapter"), "--tasks", "gsm8k,mmlu", "--limit", "1"]
    code, _, stderr = run_main(monkeypatch, capsys, *args, "eval.mmlu.subjects=[anatomy]", "--num-fewshot", "2",
                               "--max-new-tokens", "3", "--json", str(tmp_path / "two-shot.json"))  # fmt: skip
    assert code == 0, stderr
    document = json.loads((tmp_path / "two-shot.json").read_text())
    shots = gsm8k_rows(shared_data, "train", 2)
    question = gsm8k_rows(shared_data, "test", 1)[0]["question"]
    assert document["records"]["gsm8k"][0]["prompt"] == gsm8k.build_prompt(question, shots)
    assert document["records"]["mmlu"][0]["prompt"].count("\nAnswer:") == 3  # two shots, then the question


def test_a_mistyped_override_without_a_recipe_gets_the_did_you_mean_line(alpaca_run, monkeypatch, capsys):
    args = ["eval", "--adapter", str(alpaca_run / "adapter"), "eval.gsm8k.num_fewshto=0"]
    code, _, stderr = run_main(monkeypatch, capsys, *args)
    assert_single_error(code, stderr, "'eval.gsm8k.num_fewshto=0'", "did you mean 'eval.gsm8k.num_fewshot'?")


def test_more_shots_than_the_train_split_holds_is_one_line_not_a_silent_fewer(
    tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "five"
    write_jsonl(folder / "train.jsonl", gsm8k_rows(shared_data, "train", 5))
    write_jsonl(folder / "test.jsonl", gsm8k_rows(shared_data, "test", 1))
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--gsm8k-path", str(folder)]
    code, _, stderr = run_main(monkeypatch, capsys, *args, "--json", str(tmp_path / "out.json"))
    line = f"eval.gsm8k.num_fewshot=8 but {folder / 'train.jsonl'} has only 5 rows: pass --num-fewshot 5"
    assert_single_error(code, stderr, line)
    assert not (tmp_path / "out.json").exists()


def test_mmlu_shots_are_never_fewer_than_asked_and_zero_shots_need_no_dev_split(
    tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "mmlu"
    (folder / "test").mkdir(parents=True)
    shutil.copy(shared_data / "mmlu" / "test" / "anatomy_test.csv", folder / "test")
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "mmlu", "--limit", "2", f"eval.mmlu.path={folder}",
            "eval.mmlu.subjects=[anatomy]", "--json", str(tmp_path / "out.json")]  # fmt: skip
    code, _, stderr = run_main(monkeypatch, capsys, *args, "--num-fewshot", "0")
    assert code == 0, stderr
    assert json.loads((tmp_path / "out.json").read_text())["mmlu"]["num_samples"] == 2

    (folder / "dev").mkdir()
    header, *rows = (shared_data / "mmlu" / "dev" / "anatomy_dev.csv").read_text().splitlines()
    (folder / "dev" / "anatomy_dev.csv").write_text("\n".join([header, *rows[:2]]) + "\n")
    code, _, stderr = run_main(monkeypatch, capsys, *args, "--num-fewshot", "3")
    line = f"eval.mmlu.num_fewshot=3 but {folder / 'dev' / 'anatomy_dev.csv'} has only 2 rows: pass --num-fewshot 2"
    assert_single_error(code, stderr, line)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--batch-size", "0"], "--batch-size must be auto or a positive integer, got '0'"),
        (["--batch-size", "-2"], "--batch-size must be auto or a positive integer, got '-2'"),
        (["--batch-size", "many"], "--batch-size must be auto or a positive integer, got 'many'"),
        (["--limit", "0"], "--limit must be a positive integer, got '0'"),
        (["--limit", "ten"], "--limit must be a positive integer, got 'ten'"),
        (["--num-fewshot", "-1"], "--num-fewshot must be 0 or more, got '-1'"),
        (["--num-fewshot", "2.5"], "--num-fewshot must be 0 or more, got '2.5'"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got '0'"),
        (["eval.batch_size=0"], "eval.batch_size: value error, must be auto or a positive integer"),
        (["--prompt-format", "alpaca"], "eval.prompt_format must be one of harness or train; got 'alpaca'"),
    ],
)
def test_bad_numbers_are_one_line_errors(args, named, tiny_model_dir, monkeypatch, capsys):
    code, _, stderr = run_main(monkeypatch, capsys, "eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k", *args)
    assert_single_error(code, stderr, named)


def training_prompt_ids(row: dict, data: DataConfig, tokenizer) -> list[int]:
    """The tokens training puts before the first trained one, for one row (data/examples.py's rendering)."""
    example = build_splits(data, tokenizer, seed=0).train[0]
    return example.input_ids[: next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)]


def greedy_output(model_dir: Path, adapter: Path, ids: list[int], max_new_tokens: int, stops: list[str]) -> str:
    """transformers' greedy continuation of `ids` with the adapter loaded, cut at the first stop string."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    load_adapter(model, adapter)
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
    return cut_at_stop(text, [*stops, tokenizer.eos_token])


def test_prompt_format_train_asks_in_the_alpaca_format_the_adapter_learnt(
    alpaca_run, tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys
):
    test_row = gsm8k_rows(shared_data, "test", 1)[0]
    args = ["eval", "--adapter", str(alpaca_run / "adapter"), "--tasks", "gsm8k", "--limit", "1",
            "--max-new-tokens", "12", "--prompt-format", "train"]  # fmt: skip
    assert json.loads((alpaca_run / "adapter" / CONFIG_FILE).read_text())["data_format"] == "alpaca"
    code, _, stderr = run_main(monkeypatch, capsys, *args, "--num-fewshot", "0", "--json", str(tmp_path / "0.json"))
    assert code == 0, stderr
    record = json.loads((tmp_path / "0.json").read_text())["records"]["gsm8k"][0]
    row = {"instruction": test_row["question"], "output": test_row["answer"]}
    data = DataConfig(path=str(write_jsonl(tmp_path / "row.jsonl", [row])), format="alpaca", validation_fraction=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = training_prompt_ids(row, data, tokenizer)
    assert tokenizer(record["prompt"])["input_ids"] == ids
    stops = [*gsm8k.STOP_SEQUENCES, ALPACA_STOP]
    assert record["output"] == greedy_output(tiny_model_dir, alpaca_run / "adapter", ids, 12, stops)

    code, _, stderr = run_main(monkeypatch, capsys, *args, "--num-fewshot", "2", "--json", str(tmp_path / "2.json"))
    assert code == 0, stderr
    prompt = json.loads((tmp_path / "2.json").read_text())["records"]["gsm8k"][0]["prompt"]
    shots = "".join(
        ALPACA_PROMPT.format(instruction=shot["question"], input_block="") + shot["answer"] + "\n\n"
        for shot in gsm8k_rows(shared_data, "train", 2)
    )
    assert prompt == shots + record["prompt"]


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter recorded as trained on chat data, with nonzero B so that it changes the outputs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = inject_adapter(model, AdapterConfig(method="lora", rank=4, targets=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("chat") / "adapter"
    save_adapter(adapter, directory, base_model=str(tiny_model_dir), extra={"data_format": "chat"})
    return directory


def test_prompt_format_train_asks_in_the_chat_template_without_a_second_bos(
    chat_adapter, tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys
):
    test_row = gsm8k_rows(shared_data, "test", 1)[0]
    args = ["eval", "--adapter", str(chat_adapter), "--tasks", "gsm8k", "--limit", "1", "--max-new-tokens", "12",
            "eval.prompt_format=train", "--num-fewshot", "0", "--json", str(tmp_path / "chat.json")]  # fmt: skip
    code, _, stderr = run_main(monkeypatch, capsys, *args)
    assert code == 0, stderr
    record = json.loads((tmp_path / "chat.json").read_text())["records"]["gsm8k"][0]
    row = {"messages": [{"role": "user", "content": test_row["question"]}, {"role": "assistant", "content": "x"}]}
    data = DataConfig(path=str(write_jsonl(tmp_path / "row.jsonl", [row])), format="chat", validation_fraction=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = training_prompt_ids(row, data, tokenizer)
    assert ids[0] != tokenizer.bos_token_id  # the tiny model's template writes none, and training adds none
    assert tokenizer(record["prompt"], add_special_tokens=False)["input_ids"] == ids
    assert record["output"] == greedy_output(tiny_model_dir, chat_adapter, ids, 12, gsm8k.STOP_SEQUENCES)


def test_eval_without_any_model_says_what_to_pass(monkeypatch, capsys):
    code, _, stderr = run_main(monkeypatch, capsys, "eval", "--tasks", "gsm8k")
    assert_single_error(
        code, stderr, "eval needs --model PATH_OR_ID, --adapter DIR (whose base model it uses) or a RECIPE"
    )


def test_prompt_format_train_without_a_known_training_format_is_one_line(tiny_model_dir, monkeypatch, capsys):
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--prompt-format", "train"]
    code, _, stderr = run_main(monkeypatch, capsys, *args)
    assert_single_error(code, stderr, "eval.prompt_format=train needs the data format", "--adapter DIR")


def test_mmlu_prints_one_plain_line_per_subject_when_not_a_terminal(tiny_model_dir, tmp_path, monkeypatch, capsys):
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--tasks",
        "mmlu",
        "--limit",
        "3",
        "--json",
        str(tmp_path / "m.json"),
    ]
    code, _, stderr = run_main(monkeypatch, capsys, *args, "eval.mmlu.subjects=[anatomy,virology]")
    assert code == 0, stderr
    document = json.loads((tmp_path / "m.json").read_text())
    lines = [line for line in stderr.splitlines() if line.startswith("mmlu ")]
    assert len(lines) == 2 and "mmlu:" not in stderr  # plain lines, no tqdm bar (whose label would be "mmlu:")
    for number, (line, subject) in enumerate(zip(lines, ["anatomy", "virology"]), start=1):
        hits = sum(r["correct"] for r in document["records"]["mmlu"] if r["subject"] == subject)
        accuracy = document["mmlu"][f"subject/{subject}"]
        assert line.startswith(f"mmlu {number}/2  {subject}  acc {accuracy:.4f} ({hits}/3)  ")
        assert line.endswith(" s")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_progress_is_one_redrawn_bar_not_lines():
    stream = Terminal()
    with TaskProgress("mmlu", 2, "subject", stream) as progress:
        progress.update("anatomy", "acc 0.5000 (1/2)")
        progress.update("virology", "acc 1.0000 (2/2)")
    text = stream.getvalue()
    assert "mmlu: 100%" in text and "virology acc 1.0000 (2/2)" in text and "\r" in text
    assert "mmlu 1/2" not in text and "mmlu 2/2" not in text
