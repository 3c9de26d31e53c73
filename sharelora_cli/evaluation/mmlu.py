"""MMLU: 5-shot multiple choice scored by the log-likelihood of " A", " B", " C", " D".

The prompt is lm-evaluation-harness's default `mmlu` one: a description line naming the subject, the
first `num_fewshot` dev questions of the subject with their answer letter, then the test question ending
in "Answer:". Accuracy is reported per subject, per category (Hendrycks et al.'s four groups), as the mean
over subjects (macro) and over all questions (micro; the harness's "mmlu" number).
"""

from pathlib import Path

from sharelora_cli.config.recipe import MMLUTaskConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.engine import Engine
from sharelora_cli.evaluation.progress import TaskProgress
from sharelora_cli.evaluation.results import TaskResult
from sharelora_cli.evaluation.sources import first_rows, is_local, read_hub, read_local

LETTERS = ["A", "B", "C", "D"]
CATEGORIES = {
    "stem": [
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
        "high_school_physics", "high_school_statistics", "machine_learning",
    ],
    "humanities": [
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ],
    "social_sciences": [
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
        "us_foreign_policy",
    ],
    "other": [
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ],
}  # fmt: skip
CATEGORY_OF = {subject: category for category, subjects in CATEGORIES.items() for subject in subjects}
SUBJECTS = sorted(CATEGORY_OF)


def load_subject(path: str, subject: str, split: str) -> list[dict]:
    """Rows {question, choices (4), answer (0-3)} from PATH/<split>/<subject>_<split>.csv or the hub dataset."""
    if is_local(path):
        rows = read_local(Path(path) / split / f"{subject}_{split}.csv")
        try:
            return [_from_csv(row) for row in rows]
        except (KeyError, ValueError):
            raise UserError(
                f"{path}/{split}/{subject}_{split}.csv needs the header question,choice0,choice1,choice2,choice3,answer "
                "with answer an index 0-3"
            ) from None
    return [
        {"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])}
        for r in read_hub(path, split, name=subject)
    ]


def _from_csv(row: dict) -> dict:
    answer = int(row["answer"])
    if answer not in range(4):
        raise ValueError(answer)
    return {"question": row["question"], "choices": [row[f"choice{i}"] for i in range(4)], "answer": answer}


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(doc: dict) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"]))
    return f"{doc['question'].strip()}{options}\nAnswer:"


def build_prompt(subject: str, shots: list[dict], doc: dict) -> str:
    examples = "".join(f"{format_question(shot)} {LETTERS[shot['answer']]}\n\n" for shot in shots)
    return description(subject) + examples + format_question(doc)


def evaluate(engine: Engine, cfg: MMLUTaskConfig, limit: int | None) -> TaskResult:
    subjects = check_subjects(cfg.subjects)
    records = []
    with TaskProgress("mmlu", len(subjects), "subject") as progress:
        for subject in subjects:
            scored = evaluate_subject(engine, cfg, subject, limit)
            records.extend(scored)
            verdicts = [record["correct"] for record in scored]
            progress.update(subject, f"acc {_mean(verdicts):.4f} ({sum(verdicts)}/{len(verdicts)})")
    return TaskResult(accuracy_metrics(records), records)


def evaluate_subject(engine: Engine, cfg: MMLUTaskConfig, subject: str, limit: int | None) -> list[dict]:
    """One record per test question of the subject."""
    shots = few_shot(cfg, subject) if cfg.num_fewshot else []
    docs = load_subject(cfg.path, subject, "test")[:limit]
    prompts = [build_prompt(subject, shots, doc) for doc in docs]
    scores = engine.loglikelihood([(prompt, f" {letter}") for prompt in prompts for letter in LETTERS])
    records = []
    for index, (doc, prompt) in enumerate(zip(docs, prompts)):
        logprobs = [score.logprob for score in scores[4 * index : 4 * index + 4]]
        chosen = max(range(4), key=logprobs.__getitem__)
        records.append(
            {
                "subject": subject,
                "prompt": prompt,
                "logprobs": logprobs,
                "extracted": LETTERS[chosen],
                "target": LETTERS[doc["answer"]],
                "correct": chosen == doc["answer"],
            }
        )
    return records


def few_shot(cfg: MMLUTaskConfig, subject: str) -> list[dict]:
    """The subject's first num_fewshot dev questions."""
    local = Path(cfg.path) / "dev" / f"{subject}_dev.csv"
    source = str(local) if is_local(cfg.path) else f"dataset {cfg.path} ({subject}, dev split)"
    return first_rows(load_subject(cfg.path, subject, "dev"), cfg.num_fewshot, source, "eval.mmlu.num_fewshot")


def check_subjects(subjects: list[str] | None) -> list[str]:
    unknown = sorted(set(subjects or []) - set(SUBJECTS))
    if unknown:
        raise UserError(f"eval.mmlu.subjects: unknown subject(s) {', '.join(unknown)}; e.g. {', '.join(SUBJECTS[:3])}")
    return subjects or SUBJECTS


def accuracy_metrics(records: list[dict]) -> dict[str, float | int]:
    """Micro and macro accuracy, accuracy per category (question-weighted) and per subject."""
    by_subject: dict[str, list[bool]] = {}
    for record in records:
        by_subject.setdefault(record["subject"], []).append(record["correct"])
    per_subject = {subject: sum(hits) / len(hits) for subject, hits in by_subject.items()}
    metrics: dict[str, float | int] = {
        "acc_micro": _mean([r["correct"] for r in records]),
        "acc_macro": _mean(list(per_subject.values())),
        "num_samples": len(records),
    }
    for category in CATEGORIES:
        hits = [r["correct"] for r in records if CATEGORY_OF[r["subject"]] == category]
        if hits:
            metrics[f"category/{category}"] = _mean(hits)
    metrics.update({f"subject/{subject}": accuracy for subject, accuracy in per_subject.items()})
    return metrics


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0
