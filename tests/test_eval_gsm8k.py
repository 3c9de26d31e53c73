"""GSM8K task: strict-match and flexible-extract scored exactly as lm-evaluation-harness scores them, and its prompts."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation import gsm8k


@pytest.fixture(scope="module")
def references(shared_data) -> list[dict]:
    data = str(shared_data / "gsm8k")
    return gsm8k.load_split(data, "train") + gsm8k.load_split(data, "test")


def test_strict_match_recovers_every_reference_answer(references):
    assert len(references) == 7473 + 1319
    for row in references:
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        float(gold)  # every reference is a plain number once commas are gone
        assert gsm8k.extract(row["answer"], "strict-match") == row["answer"].split("#### ")[-1].strip()
        assert gsm8k.score(row["answer"], row["answer"])["strict-match"]["correct"]
    # The last-number fallback is a real heuristic: once the #### line is gone it is usually, not always, the answer.
    without_final = [(re.sub(r"\n#### .*$", "", row["answer"]), row["answer"]) for row in references]
    hits = sum(gsm8k.score(text, answer)["flexible-extract"]["correct"] for text, answer in without_final)
    assert 0.5 < hits / len(references) < 1.0


@pytest.fixture(scope="module")
def harness_task(shared_data):
    from sharelora_cli.evaluation.harness_tasks import gsm8k_task

    return gsm8k_task(shared_data / "gsm8k", num_fewshot=0)


def harness_scores(task, doc: dict, generation: str) -> dict[str, tuple[str, bool]]:
    """lm-eval's own pipeline on one generation: each filter ensemble of the task, then its process_results."""
    from lm_eval.api.instance import Instance

    scores = {}
    for ensemble in task._filters:
        instance = Instance("generate_until", doc, ("", {}), 0, resps=[generation])
        ensemble.apply([instance])
        filtered = instance.filtered_resps[ensemble.name]
        scores[ensemble.name] = (filtered, task.process_results(doc, [filtered])["exact_match"] == 1.0)
    return scores


def our_scores(doc: dict, generation: str) -> dict[str, tuple[str, bool]]:
    record = gsm8k.score(generation, doc["answer"])
    return {metric: (record[metric]["extracted"], record[metric]["correct"]) for metric in gsm8k.FILTERS}


TRICKY = [
    "",
    "I do not know.",  # no number: both give [invalid]
    "She pays 5 + 3 = 8 dollars.\n#### 8",
    "#### 8\nQuestion 2: #### 9",  # several ####: strict takes the first, flexible the last number
    "It drops 12 degrees, so #### -12",
    "Total: $1,250.\n#### 1,250",
    "#### $18",  # strict needs a digit right after "#### "
    "The answer is 18.",  # trailing period
    "#### 18.",
    "18.00",
    "That is 3.5 hours.\n#### 3.5",
    "#### 1.5e3",
    "-$5",
    "####18",
    "####  18",
    "#### .",
    "#### ,",
    "1,2,3, go",
    "answer: 72\n",
    "answer: 72.\n",
    "#### 72\n\n",
    "x = 12 y = 1,000,000",
    "İ 72 ÀB",
    "72\x00",
]


@pytest.mark.parametrize("generation", TRICKY)
def test_both_metrics_equal_the_harness_on_tricky_generations(harness_task, generation):
    docs = list(harness_task.test_docs())[:3]
    for doc in docs:
        assert our_scores(doc, generation) == harness_scores(harness_task, doc, generation)


def test_both_metrics_equal_the_harness_on_reference_solutions(harness_task):
    """Correct answers (whole solutions), wrong ones (another question's), and solutions without their #### line."""
    docs = list(harness_task.test_docs())[:40]
    for i, doc in enumerate(docs):
        other = docs[(i + 1) % len(docs)]["answer"]
        for generation in (doc["answer"], other, re.sub(r"\n#### .*$", "", doc["answer"]), doc["answer"] + "\n\n"):
            assert our_scores(doc, generation) == harness_scores(harness_task, doc, generation)


NOISE = st.text(alphabet="0123456789 ,.$-#\nAanswer:=İẞ\x00", max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(generation=NOISE, reference=NOISE)
def test_both_metrics_equal_the_harness_on_random_text(harness_task, generation, reference):
    """Random outputs against a real reference and against random references (exact_match normalises both sides)."""
    real = next(iter(harness_task.test_docs()))
    # Also with the real reference's final answer embedded, so that correct verdicts are exercised too.
    for text in (generation, generation.replace("=", real["answer"].split("#### ")[-1])):
        assert our_scores(real, text) == harness_scores(harness_task, real, text)
    made_up = {"question": "q", "answer": f"{reference}#### {generation}"}
    assert our_scores(made_up, generation) == harness_scores(harness_task, made_up, generation)


def test_exact_match_is_strict_else_flexible():
    doc_answer = "He has 3 + 4 = 7 apples.\n#### 7"
    assert gsm8k.score("so 7 apples\n#### 7", doc_answer)["correct"]
    assert (
        gsm8k.score("so 7 apples", doc_answer)["correct"]
        and not gsm8k.score("so 7 apples", doc_answer)["strict-match"]["correct"]
    )
    assert not gsm8k.score("7 apples\n#### 8", doc_answer)["correct"]  # strict's wrong answer wins over the last number
    assert gsm8k.score("no idea", doc_answer)["extracted"] is None


def test_prompt_matches_harness_gsm8k_with_first_n_shots(shared_data, references):
    from sharelora_cli.evaluation.harness_tasks import gsm8k_task

    task = gsm8k_task(shared_data / "gsm8k", num_fewshot=8)
    task.set_fewshot_seed(1234)
    shots = references[:8]
    for doc in list(task.test_docs())[:5]:
        assert gsm8k.build_prompt(doc["question"], shots) == task.fewshot_context(doc, 8)
    assert gsm8k.build_prompt("Q?", shots[:1]).endswith("#### 72\n\nQuestion: Q?\nAnswer:")


def test_missing_split_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train.jsonl not found"):
        gsm8k.load_split(str(tmp_path), "train")
