"""scripts/method_study.py runs end to end at tiny sizes: the documented rows, the tables, finished runs reused."""

import importlib.util
import json
from pathlib import Path

import pytest
from script_module import load_script
from single_thread import single_thread

from sharelora_cli.data.synthetic_tasks import write_tasks
from sharelora_cli.models.pretrain import PretrainConfig, pretrain

FIELDS = {"method", "rank", "seed", "accuracy", "trainable_params", "step_time_s"}


@pytest.fixture(scope="module")
def method_study():
    return load_script("method_study")


def run_study(method_study, tmp_path: Path, base: Path, tasks: Path, json_name: str) -> None:
    with single_thread():
        method_study.main([
            "--base", str(base), "--tasks", str(tasks), "--methods", "lora,shareab,peft-lora", "--ranks", "2",
            "--match-lora-ranks", "2", "--seeds", "0,1", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "runs"),
            "--json", str(tmp_path / json_name), "--markdown", str(tmp_path / "study.md"), "--plot", str(tmp_path / "study.png"),
        ])  # fmt: skip


def test_method_study_smoke_writes_rows_and_tables_and_reuses_finished_runs(method_study, tmp_path, capsys):
    base = pretrain(
        tmp_path / "base", PretrainConfig(steps=2, batch_size=8, hidden=32, layers=2, vocab_size=300, warmup_steps=1)
    )
    tasks = write_tasks(tmp_path / "tasks", seed=0, train_size=40, test_size=6)
    (tmp_path / "study.md").write_text("# Study\n\nFindings written by hand.\n")
    run_study(method_study, tmp_path, base, tasks, "rows.json")
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert all(set(row) == FIELDS and 0 <= row["accuracy"] <= 1 for row in rows)
    runs = {(row["method"], row["rank"]): row["trainable_params"] for row in rows}
    # On 2 layers ShareAB at rank 2L has LoRA r=2's count exactly, so the equal-budget sweep picks rank 4.
    assert sorted(runs) == [("lora", 2), ("peft-lora", 2), ("shareab", 2), ("shareab", 4)]
    assert runs[("peft-lora", 2)] == runs[("lora", 2)] == runs[("shareab", 4)] == 2 * runs[("shareab", 2)]
    assert sorted(row["seed"] for row in rows) == [0] * 4 + [1] * 4
    markdown = (tmp_path / "study.md").read_text()
    assert markdown.startswith("# Study\n\nFindings written by hand.\n") and "| shareab | 4 | " in markdown
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "study.png").is_file() == has_matplotlib
    assert ("pip install -e .[plots]" in printed) != has_matplotlib

    run_study(method_study, tmp_path, base, tasks, "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == rows  # every run reused, step times included
    assert (tmp_path / "study.md").read_text().count("<!-- method-study:begin -->") == 1


@pytest.mark.parametrize(
    "args, named",
    [
        (["--ranks", "8,x"], "--ranks"),
        (["--ranks", "0"], "--ranks"),
        (["--methods", "lora,dora"], "dora"),
        (["--base", "nowhere"], "--base"),
        (["--depth-study", "--lrs-at", "8:1e-3"], "--lrs-at"),
        (["--depth-study", "--budgets", "1", "--lrs-at", "8=1e-3"], "--lrs-at"),
    ],
)
def test_bad_arguments_are_one_line_errors(method_study, args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        method_study.main(args)
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "error:" in errors[-1] and named in errors[-1]


DEPTH_FIELDS = {
    "method", "lora_rank", "knob", "value", "lr", "seed", "trainable_params", "step_time_s", "peak_memory_bytes",
    "validation_accuracy", "accuracy",
}  # fmt: skip


def test_depth_study_smoke_chooses_the_lr_on_validation_rows_and_scores_the_seeds_on_test(
    method_study, tmp_path, capsys
):
    """Three layers of width 32, two steps a run: LoRA, ShareAB and VB-LoRA held to LoRA r=1's count."""
    base = pretrain(
        tmp_path / "base", PretrainConfig(steps=2, batch_size=8, hidden=32, layers=3, vocab_size=300, warmup_steps=1)
    )
    tasks = write_tasks(tmp_path / "tasks", seed=0, train_size=30, test_size=6)
    args = [
        "--depth-study", "--base", str(base), "--tasks", str(tasks), "--methods", "lora,shareab,vblora",
        "--budgets", "1", "--lrs", "1e-3,1e-2", "--seeds", "0,1", "--steps", "2", "--batch-size", "4",
        "--validation-size", "5", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "rows.json"),
        "--markdown", str(tmp_path / "study.md"), "--plot", str(tmp_path / "deep.png"),
    ]  # fmt: skip
    with single_thread():
        method_study.main(args)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert all(set(row) == DEPTH_FIELDS for row in rows)
    validation = tmp_path / "runs" / "validation"
    val_questions = {json.loads(line)["question"] for line in (validation / "test.jsonl").read_text().splitlines()}
    train_questions = [json.loads(line)["question"] for line in (validation / "train.jsonl").read_text().splitlines()]
    assert len(val_questions) == 5 and len(train_questions) == 25 and not val_questions & set(train_questions)
    for method in ("lora", "shareab", "vblora"):
        mine = [row for row in rows if row["method"] == method]
        sweep = {row["lr"]: row["validation_accuracy"] for row in mine if row["seed"] == 0}
        chosen = max(sorted(sweep), key=lambda lr: sweep[lr])  # the best validation score, the smaller lr on a tie
        tested = [row for row in mine if row["accuracy"] is not None]
        assert sorted(sweep) == [1e-3, 1e-2] and all(0 <= v <= 1 for v in sweep.values())
        assert sorted(row["seed"] for row in tested) == [0, 1] and {row["lr"] for row in tested} == {chosen}
        assert len(mine) == 3 and all(row["peak_memory_bytes"] > 0 for row in mine)
    counts = {row["method"]: (row["knob"], row["value"], row["trainable_params"]) for row in rows}
    # On 3 layers ShareAB at rank 3 trains exactly LoRA r=1's count, 3 · 560. VB-LoRA keeps rank 1 and turns its
    # bank: n vectors of 16 (the widths' common divisor) and a logit for each per sub-vector, 3 · 560 / 16 of them,
    # 121n in all; 1,680 / 121 = 13.9, so 14 vectors.
    assert counts["lora"][2] == 3 * 560 and counts["shareab"] == ("rank", 3, 3 * 560)
    assert counts["vblora"] == ("vblora.num_vectors", 14, 121 * 14)
    markdown = (tmp_path / "study.md").read_text()
    assert "<!-- method-study-deep:begin -->" in markdown and "| shareab | rank 3 |" in markdown
    assert markdown.count("(0.001: ") == 3  # each method's validation scores in lr order
    assert ("pip install -e .[plots]" in capsys.readouterr().out) != (tmp_path / "deep.png").is_file()

    written = {path.name: path.stat().st_mtime_ns for path in validation.iterdir()}
    with single_thread():
        method_study.main([*args[:-6], "--json", str(tmp_path / "again.json"), *args[-4:]])
    assert json.loads((tmp_path / "again.json").read_text()) == rows  # every run and score reused
    # Unchanged, so a study of other budgets on the same --out never finds them half rewritten.
    assert {path.name: path.stat().st_mtime_ns for path in validation.iterdir()} == written

    # --finished-only trains nothing: the finished (method, budget) pairs as before, MiSS named as left out.
    # No run has lr 0.05: only --lrs-at's grid at r=1, the one they ran, finds them.
    finished = [*args[:6], "lora,shareab,vblora,miss", *args[7:-6], "--json", str(tmp_path / "finished.json")]
    grids = ["--lrs", "5e-2", "--lrs-at", "1=1e-3,1e-2"]
    with single_thread():
        method_study.main([*finished, *args[-4:], *grids, "--finished-only"])
    assert json.loads((tmp_path / "finished.json").read_text()) == rows
    markdown = (tmp_path / "study.md").read_text()
    assert "at LoRA r=1's budget: miss." in markdown
    assert "over lrs 0.05 (at LoRA r=1's budget over 0.001, 0.01, every method alike)" in markdown
    assert not any(path.name.startswith("miss-") for path in (tmp_path / "runs").iterdir())
    empty = [*finished[:-4], "--out", str(tmp_path / "empty"), *finished[-2:], *args[-4:], "--finished-only"]
    with pytest.raises(SystemExit) as exit_info:
        method_study.main(empty)
    assert exit_info.value.code == 2 and "no (method, budget) has finished" in capsys.readouterr().err
