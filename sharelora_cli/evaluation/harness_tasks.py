"""lm-evaluation-harness's own gsm8k and mmlu tasks, pointed at the local benchmark files (no hub access).

For cross-checks only (tests, scripts/compare_lm_eval.py): the task YAML shipped with the installed lm_eval
is loaded unchanged except for where the data comes from, the few-shot count, and (GSM8K) the `first_n`
sampler, which takes the same first train rows as our prompts. lm_eval is a dev dependency.
"""

from pathlib import Path

from sharelora_cli.evaluation.mmlu import CATEGORY_OF


def _tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def task_yaml(relative: str) -> dict:
    """An installed task YAML with its includes merged."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_tasks_dir() / relative)


def gsm8k_task(data: Path, num_fewshot: int):
    from lm_eval.api.task import ConfigurableTask

    config = task_yaml("gsm8k/gsm8k.yaml")
    config.pop("tag", None)
    config.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}},
        fewshot_config={"sampler": "first_n"},
        num_fewshot=num_fewshot,
    )
    return ConfigurableTask(config=config)


def _with_choice_list(dataset):
    """Our CSVs have choice0..choice3; the harness template reads a `choices` list."""
    return dataset.map(lambda row: {"choices": [row[f"choice{i}"] for i in range(4)]})


def mmlu_task(data: Path, subject: str, num_fewshot: int):
    from lm_eval.api.task import ConfigurableTask

    config = mmlu_yaml(subject)
    config.pop("tag", None)
    files = {split: str(data / split / f"{subject}_{split}.csv") for split in ("dev", "test")}
    config.update(
        dataset_path="csv",
        dataset_name=None,
        dataset_kwargs={"data_files": files},
        process_docs=_with_choice_list,
        num_fewshot=num_fewshot,
    )
    return ConfigurableTask(config=config)


def mmlu_yaml(subject: str) -> dict:
    if subject not in CATEGORY_OF:
        raise ValueError(f"unknown MMLU subject {subject}")
    return task_yaml(f"mmlu/default/mmlu_{subject}.yaml")
