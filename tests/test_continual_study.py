"""scripts/continual_study.py runs a continual recipe per method and seed at tiny sizes: rows, tables, reuse, bad input."""

import json
import statistics
from pathlib import Path

import pytest
from script_module import load_script
from single_thread import single_thread

from sharelora_cli.data.synthetic_tasks import write_tasks
from sharelora_cli.models.pretrain import PretrainConfig, pretrain

STAGES = ("story", "smallest")


@pytest.fixture(scope="module")
def continual_study():
    return load_script("continual_study")


def write_recipe(path: Path, base: Path, tasks: Path, stages: tuple[str, ...]) -> Path:
    stage_lines = "".join(
        f"  - name: {skill}\n    data: {{path: {tasks}/{skill}/train.jsonl}}\n"
        f"    eval: {{gsm8k: {{path: {tasks}/{skill}}}}}\n"
        for skill in stages
    )
    path.write_text(f"""model: {{name_or_path: {base}}}
adapter: {{method: lora, rank: 2, alpha: 4, targets: [q_proj, v_proj, down_proj]}}
data: {{format: gsm8k, max_length: 96, validation_fraction: 0.0}}
train: {{max_steps: 2, batch_size: 4, lr: 1.0e-2, warmup_steps: 0, log_every: 1, eval_every: 2, checkpoint_every: 2}}
eval: {{tasks: [gsm8k], batch_size: 8, gsm8k: {{num_fewshot: 0, max_new_tokens: 12}}}}
stages:
{stage_lines}""")
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual-study")
    with single_thread():
        base = pretrain(
            root / "base", PretrainConfig(steps=2, batch_size=8, hidden=32, layers=2, vocab_size=300, warmup_steps=1)
        )
    tasks = write_tasks(root / "tasks", seed=0, train_size=24, test_size=5)
    return root, write_recipe(root / "recipe.yaml", base, tasks, STAGES)


def run_study(module, root: Path, recipe: Path, json_name: str) -> None:
    with single_thread():
        module.main(
            [
                "--recipe",
                str(recipe),
                "--methods",
                "lora,shareab",
                "--seeds",
                "0,1",
                "--out",
                str(root / "runs"),
                "--json",
                str(root / json_name),
                "--markdown",
                str(root / "continual.md"),
            ]
        )


def test_study_writes_a_row_per_run_and_per_method_tables_and_reuses_finished_runs(continual_study, setting):
    root, recipe = setting
    (root / "continual.md").write_text("# Continual\n\nFindings written by hand.\n")
    run_study(continual_study, root, recipe, "rows.json")
    rows = json.loads((root / "rows.json").read_text())
    assert [(row["method"], row["seed"]) for row in rows] == [("lora", 0), ("lora", 1), ("shareab", 0), ("shareab", 1)]
    for row in rows:
        assert row["tasks"] == list(STAGES) and row["stages_done"] == 2 and len(row["matrix"]) == 2
        assert all(0 <= value <= 1 for line in row["matrix"] for value in line)
        # Each row is the run's own continual.json, with the run's identity added.
        saved = json.loads((root / "runs" / f"{row['method']}-s{row['seed']}" / "continual.json").read_text())
        assert {key: row[key] for key in saved} == saved
    lora, shareab = rows[0]["trainable_params"], rows[2]["trainable_params"]
    assert lora > shareab > 0  # ShareAB keeps one A and one B per module type across the 2 layers

    text = (root / "continual.md").read_text()
    assert text.startswith("# Continual\n\nFindings written by hand.\n")
    assert "**lora**" in text and "**shareab**" in text
    first_cell = statistics.mean(row["matrix"][0][0] for row in rows[:2])  # lora's story accuracy after stage 1
    lora_table = text.split("**lora**", 1)[1]
    assert f"| {STAGES[0]} | {100 * first_cell:.1f} |" in lora_table

    run_study(continual_study, root, recipe, "again.json")
    assert json.loads((root / "again.json").read_text()) == rows  # every run reused
    assert text.count("<!-- continual-study:begin -->") == 1
    assert (root / "continual.md").read_text().count("<!-- continual-study:begin -->") == 1


def test_summary_averages_seeds_cell_by_cell(continual_study):
    rows = [
        {
            "method": "sharea",
            "rank": 4,
            "seed": seed,
            "tasks": ["a", "b"],
            "trainable_params": 10,
            "initial": [0.0, 0.1 * seed],
            "matrix": [[0.8, 0.0], [0.2 + 0.2 * seed, 0.9]],
            "average_accuracy": (1.1 + 0.2 * seed) / 2,
            "backward_transfer": -0.6 + 0.2 * seed,
            "forgetting": {"a": 0.6 - 0.2 * seed},
        }
        for seed in (0, 1)
    ]
    (entry,) = continual_study.summarise(rows)
    assert entry["matrix"] == [[0.8, 0.0], [pytest.approx(0.3), 0.9]] and entry["initial"] == [0.0, 0.05]
    assert entry["backward_transfer"] == (pytest.approx(-0.5), pytest.approx(statistics.stdev([-0.6, -0.4])))
    assert entry["forgetting"]["a"][0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--methods", "lora,dora"], "dora"),
        (["--seeds", "1,x"], "--seeds"),
        (["--recipe", "nowhere.yaml"], "nowhere.yaml"),
        (["--recipe", "recipes/quickstart.yaml"], "stage"),
    ],
)
def test_bad_arguments_are_one_line_errors(continual_study, args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        continual_study.main(args)
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "error:" in errors[-1] and named in errors[-1]
