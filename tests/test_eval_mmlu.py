"""MMLU task: prompts identical to lm-evaluation-harness's, its category mapping, and the accuracy arithmetic."""

import pytest

from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation import harness_tasks, mmlu

HARNESS_CATEGORY_TAGS = {
    "mmlu_stem_tasks": "stem",
    "mmlu_humanities_tasks": "humanities",
    "mmlu_social_sciences_tasks": "social_sciences",
    "mmlu_other_tasks": "other",
}


@pytest.mark.parametrize("subject", ["anatomy", "high_school_government_and_politics", "moral_scenarios"])
def test_prompt_matches_harness_for_subject(shared_data, subject):
    task = harness_tasks.mmlu_task(shared_data / "mmlu", subject, num_fewshot=5)
    task.set_fewshot_seed(1234)
    shots = mmlu.load_subject(str(shared_data / "mmlu"), subject, "dev")
    docs = mmlu.load_subject(str(shared_data / "mmlu"), subject, "test")
    harness_docs = list(task.test_docs())
    assert len(harness_docs) == len(docs) > 90
    for doc, harness_doc in list(zip(docs, harness_docs))[:4]:
        prompt = mmlu.build_prompt(subject, shots, doc)
        assert prompt == task.fewshot_context(harness_doc, 5)
        assert prompt.startswith(
            f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        )
        assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nD. " + doc["choices"][3] + "\nAnswer:")
        assert task.doc_to_choice(harness_doc)[task.doc_to_target(harness_doc)] == mmlu.LETTERS[doc["answer"]]


def test_subjects_descriptions_and_categories_match_harness():
    assert len(mmlu.SUBJECTS) == 57
    for subject in mmlu.SUBJECTS:
        config = harness_tasks.mmlu_yaml(subject)
        assert config["description"] == mmlu.description(subject)
        assert HARNESS_CATEGORY_TAGS[config["tag"]] == mmlu.CATEGORY_OF[subject]


def test_every_subject_has_five_dev_and_some_test_questions(shared_data):
    counts = {s: len(mmlu.load_subject(str(shared_data / "mmlu"), s, "test")) for s in mmlu.SUBJECTS}
    assert sum(counts.values()) == 14042
    assert all(len(mmlu.load_subject(str(shared_data / "mmlu"), s, "dev")) == 5 for s in mmlu.SUBJECTS)


def test_accuracy_macro_micro_and_categories():
    # anatomy (stem) 3 of 4 right, sociology (social sciences) 0 of 1, virology (other) 1 of 1.
    outcomes = [
        ("anatomy", True),
        ("anatomy", True),
        ("anatomy", True),
        ("anatomy", False),
        ("sociology", False),
        ("virology", True),
    ]
    metrics = mmlu.accuracy_metrics([{"subject": s, "correct": c} for s, c in outcomes])
    assert metrics["acc_micro"] == pytest.approx(4 / 6)
    assert metrics["acc_macro"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert (
        metrics["category/stem"] == 0.75 and metrics["category/social_sciences"] == 0 and metrics["category/other"] == 1
    )
    assert "category/humanities" not in metrics
    assert metrics["subject/anatomy"] == 0.75 and metrics["num_samples"] == 6


def test_unknown_subject_and_bad_csv_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="eval.mmlu.subjects: unknown subject"):
        mmlu.check_subjects(["anatomy", "astrology"])
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "anatomy_dev.csv").write_text("question,A,B,C,D,answer\nq,a,b,c,d,B\n")
    with pytest.raises(UserError, match="needs the header question,choice0"):
        mmlu.load_subject(str(tmp_path), "anatomy", "dev")
