"""GSM8K task: answer extraction on the real data, and prompts identical to lm-evaluation-harness's."""

import re

import pytest

from sharelora_cli.errors import UserError
from sharelora_cli.evaluation import gsm8k


@pytest.fixture(scope="module")
def references(shared_data) -> list[dict]:
    data = str(shared_data / "gsm8k")
    return gsm8k.load_split(data, "train") + gsm8k.load_split(data, "test")


def test_extraction_recovers_every_reference_answer(references):
    assert len(references) == 7473 + 1319
    recovered = 0
    for row in references:
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        extracted = gsm8k.extract_answer(row["answer"])
        recovered += extracted is not None and gsm8k.normalize(extracted) == gold == gsm8k.normalize(row["answer"])
        float(gold)  # every reference is a plain number once commas are gone
    assert recovered == len(references)


def test_extraction_agrees_with_harness_filters(references):
    """Strict (#### N) on the references, and the last-number fallback once the #### line is removed."""
    from lm_eval.filters.extraction import RegexFilter

    config = gsm8k_yaml()
    strict, flexible = (RegexFilter(**{k: v for k, v in f["filter"][0].items() if k != "function"}) for f in filters(config))
    with_final = [row["answer"] for row in references]
    without_final = [re.sub(r"\n#### .*$", "", text) for text in with_final]
    assert all("####" not in text for text in without_final)
    harness_strict = [out[0] for out in strict.apply([[t] for t in with_final], references)]
    harness_flexible = [out[0] for out in flexible.apply([[t] for t in without_final], references)]
    assert [gsm8k.extract_answer(t) for t in with_final] == harness_strict
    ours_flexible = [gsm8k.extract_answer(t) for t in without_final]
    assert ours_flexible == [None if h == "[invalid]" else h for h in harness_flexible]
    # The fallback is a real heuristic: the last number of the reasoning is usually, not always, the answer.
    hits = sum(gsm8k.normalize(o or "") == gsm8k.normalize(row["answer"]) for o, row in zip(ours_flexible, references))
    assert 0.5 < hits / len(references) < 1.0


def gsm8k_yaml() -> dict:
    from sharelora_cli.evaluation.harness_tasks import task_yaml

    return task_yaml("gsm8k/gsm8k.yaml")


def filters(config: dict) -> list[dict]:
    return sorted(config["filter_list"], key=lambda f: f["name"] != "strict-match")


def test_normalization_matches_harness_exact_match():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    metric = next(m for m in gsm8k_yaml()["metric_list"] if m["metric"] == "exact_match")
    kwargs = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    pairs = [("$1,234.", "1234"), ("18", "The total is 18\n#### 18"), ("-3.5", "#### -3.5"), ("1,000", "#### 100"), ("12.", "#### 12.0")]
    for prediction, reference in pairs:
        ours = gsm8k.normalize(prediction) == gsm8k.normalize(reference)
        theirs = exact_match_hf_evaluate([prediction], [reference], **kwargs)["exact_match"] == 1.0
        assert ours == theirs
    assert [gsm8k.normalize(p) == gsm8k.normalize(r) for p, r in pairs] == [True, True, True, False, False]


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
