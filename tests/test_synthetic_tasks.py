"""Synthetic tasks: exact answers in GSM8K format, disjoint held-out splits, and the GSM8K evaluator scoring them."""

import json
import random
import re

import pytest

from sharelora_cli.data.synthetic_tasks import FINE_TUNING_SKILL, GAINS, LOSSES, SKILLS, TRAINED_SKILLS, write_tasks
from sharelora_cli.evaluation import gsm8k

CHAIN_LINE = re.compile(r"^(\d+)([+-])(\d+)=(\d+)$")


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def story_changes(question: str) -> tuple[int, list[int]]:
    """Start and signed changes read back from the sentences: a gain phrase adds, a loss phrase subtracts."""
    sentences = question.split(". ")
    gains = [re.compile(phrase.replace("{n}", r"(\d+)")) for phrase in GAINS]
    losses = [re.compile(phrase.replace("{n}", r"(\d+)")) for phrase in LOSSES]
    changes = []
    for sentence in [*sentences[1:-1], sentences[-1].split("?")[0]]:
        gain = next((m for p in gains if (m := p.search(sentence))), None)
        loss = next((m for p in losses if (m := p.search(sentence))), None)
        if gain or loss:
            assert not (gain and loss), sentence
            changes.append(int(gain.group(1)) if gain else -int(loss.group(1)))
    return numbers(sentences[0])[0], changes


def expected_answer(skill: str, question: str) -> int:
    """The answer computed from the question alone, independently of the generator."""
    if skill == "arithmetic":
        expression = question.removeprefix("What is ").removesuffix("?")
        terms = re.findall(r"[+-]?\d+", expression)
        return sum(int(t) for t in terms)
    if skill in ("compare", "smaller", "smallest"):
        return (max if skill == "compare" else min)(numbers(question))
    if skill == "together":
        return sum(numbers(question))
    start, changes = story_changes(question)
    return start if skill == "recall" else start + sum(changes)


def check_chain(answer: str) -> None:
    """Every `a+b=c` line is true, each line starts from the previous result, and #### repeats the last one."""
    *lines, final = answer.split("\n")
    previous = None
    for line in lines:
        match = CHAIN_LINE.match(line)
        if match is None:
            continue
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        assert c == (a + b if op == "+" else a - b) and c >= 0, line
        assert previous is None or a == previous, answer
        previous = c
    if previous is not None:
        assert final == f"#### {previous}"


@pytest.mark.parametrize("skill", list(SKILLS))
def test_every_answer_is_exact_and_ends_with_the_final_number(skill):
    rng = random.Random(7)
    for _ in range(500):
        row = SKILLS[skill](rng)
        assert row["answer"].endswith(f"\n#### {expected_answer(skill, row['question'])}"), row
        check_chain(row["answer"])


def test_story_answers_chain_one_line_per_change():
    rng = random.Random(3)
    for _ in range(200):
        row = SKILLS[FINE_TUNING_SKILL](rng)
        start, changes = story_changes(row["question"])
        lines = row["answer"].split("\n")[:-1]
        assert len(lines) == len(changes) == 2
        assert lines[0].startswith(f"{start}{'+' if changes[0] > 0 else '-'}{abs(changes[0])}=")


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_folders_are_gsm8k_layout_with_held_out_test_questions(tmp_path):
    root = write_tasks(tmp_path / "tasks", seed=5, train_size=300, test_size=60)
    for skill in SKILLS:
        train, test = gsm8k.load_split(str(root / skill), "train"), gsm8k.load_split(str(root / skill), "test")
        assert len(test) == 60 and len(train) == (300 if skill in TRAINED_SKILLS else 0)
        questions = [row["question"] for row in train + test]
        assert len(set(questions)) == len(questions)  # no repeats, and no test question in train
        assert all(set(row) == {"question", "answer"} for row in train + test)


def test_task_files_depend_only_on_the_seed(tmp_path):
    first, again, other = (write_tasks(tmp_path / name, seed, 50, 20) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    story = f"{FINE_TUNING_SKILL}/test.jsonl"
    assert (first / story).read_bytes() == (again / story).read_bytes()
    assert read(first / story) != read(other / story)


def test_gsm8k_evaluator_scores_reference_answers_as_correct_and_others_not(tmp_path):
    """What `sharelora eval --tasks gsm8k` compares: the number after "#### " against the reference's."""
    root = write_tasks(tmp_path / "tasks", seed=0, train_size=100, test_size=100)
    for skill in SKILLS:
        for row in gsm8k.load_split(str(root / skill), "test"):
            target = gsm8k.normalize(row["answer"])
            assert target == str(expected_answer(skill, row["question"]))
            wrong = row["answer"].rsplit(" ", 1)[0] + f" {int(target) + 1}"
            for metric in ("strict-match", "flexible-extract"):
                assert gsm8k.score(" " + row["answer"], row["answer"])[metric]["correct"]
                assert not gsm8k.score(" " + wrong, row["answer"])[metric]["correct"]
