"""Synthetic arithmetic tasks with exact answers, written as GSM8K rows (`question`, `answer` ending in "#### N").

They give the tiny offline model something it can really learn on 2 CPU cores (pretrain.py), and a
held-back task whose accuracy an adapter can move from near zero to near one. The skills:

- `arithmetic` "What is 7+5-3?" -> "7+5=12\n12-3=9\n#### 9": one or two steps, one chain line per step.
- `compare`    "Which is larger, 17 or 12?" -> "17>12\n#### 17".
- `smaller`    "Which is smaller, 17 or 12?" -> "12<17\n#### 12".
- `recall`     "Mia has 7 pens. She buys 5 more. Then she loses 3. How many pens did she have at the start?"
               -> "At the start: 7\n#### 7".
- `story`      "Mia has 7 pens. She buys 5 more. Then she loses 3. How many pens does she have now?"
               -> "7+5=12\n12-3=9\n#### 9".
- `smallest`   "Which is the smallest of 17, 12 and 25?" -> "12<17\n12<25\n#### 12".
- `together`   "Mia has 7 pens and Tom has 5 pens. How many pens do they have together?" -> "7+5=12\n#### 12".

Pretraining covers arithmetic, compare and recall. `story` is held back for fine-tuning (the quickstart
and the method study): a new format over known parts, the stories of `recall` (so the base knows the
words) and the chain of `arithmetic`; what is new is turning the verbs ("buys", "loses") into
operations. A base that never saw it answers with a number it can read off the story, and scores near
zero until an adapter teaches it to write the chain. `smaller` is a new operation for the tests: a base
pretrained on `compare` answers it with the larger number, and seconds of fine-tuning turn that around.
Continual fine-tuning (recipes/quickstart-continual.yaml) teaches `story`, `smallest` and `together` in
turn: three held-back skills, each a new question form the base answers wrongly.

Numbers stay small (starts up to 30, changes 1-9) so a 1M-parameter model learns the sums in minutes,
and every digit is its own token (tiny_model.train_tokenizer), which makes column arithmetic learnable.
"""

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Row = dict[str, str]

NAMES = [
    ("Mia", "She"),
    ("Tom", "He"),
    ("Ava", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Sam", "He"),
    ("Ivy", "She"),
    ("Max", "He"),
    ("Eva", "She"),
    ("Ben", "He"),
    ("Lily", "She"),
    ("Noah", "He"),
]
OBJECTS = ["apples", "pens", "cups", "books", "coins", "stamps", "shells", "cards", "eggs", "marbles", "hats", "keys"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more", "makes {n} more"]
LOSSES = ["loses {n}", "gives away {n}", "sells {n}", "breaks {n}", "uses {n}"]
STORY_START = (2, 20)
STORY_CHANGE = (1, 9)
ARITHMETIC_OPERAND = (0, 30)
ARITHMETIC_CHANGE = (1, 9)
# Rows per skill in the task folders (write_tasks).
TRAIN_SIZE, TEST_SIZE = 2000, 200


def answer_with_chain(start: int, changes: list[int]) -> str:
    """ "7+5=12\\n12-3=9\\n#### 9": one line per change, then the final number."""
    lines, total = [], start
    for change in changes:
        new_total = total + change
        lines.append(f"{total}{'+' if change >= 0 else '-'}{abs(change)}={new_total}")
        total = new_total
    return "\n".join(lines) + f"\n#### {total}"


def changes_keeping_nonnegative(rng: random.Random, start: int, steps: int, low: int, high: int) -> list[int]:
    """Signed changes of size low..high; a subtraction never takes the running total below zero."""
    changes, total = [], start
    for _ in range(steps):
        size = rng.randint(low, high)
        change = -size if size <= total and rng.random() < 0.5 else size
        changes.append(change)
        total += change
    return changes


def arithmetic(rng: random.Random) -> Row:
    start = rng.randint(*ARITHMETIC_OPERAND)
    changes = changes_keeping_nonnegative(rng, start, rng.randint(1, 2), *ARITHMETIC_CHANGE)
    expression = f"{start}" + "".join(f"{'+' if c >= 0 else '-'}{abs(c)}" for c in changes)
    return {"question": f"What is {expression}?", "answer": answer_with_chain(start, changes)}


def compare(rng: random.Random) -> Row:
    a, b = rng.sample(range(ARITHMETIC_OPERAND[1] + 1), 2)
    return {"question": f"Which is larger, {a} or {b}?", "answer": f"{max(a, b)}>{min(a, b)}\n#### {max(a, b)}"}


def smaller(rng: random.Random) -> Row:
    """The opposite of compare: a base pretrained on compare alone answers with the larger number."""
    a, b = rng.sample(range(ARITHMETIC_OPERAND[1] + 1), 2)
    return {"question": f"Which is smaller, {a} or {b}?", "answer": f"{min(a, b)}<{max(a, b)}\n#### {min(a, b)}"}


def smallest(rng: random.Random) -> Row:
    """A new operation over three numbers: one comparison line against each of the other two."""
    numbers = rng.sample(range(ARITHMETIC_OPERAND[1] + 1), 3)
    low = min(numbers)
    lines = [f"{low}<{n}" for n in numbers if n != low]
    return {
        "question": f"Which is the smallest of {numbers[0]}, {numbers[1]} and {numbers[2]}?",
        "answer": "\n".join(lines) + f"\n#### {low}",
    }


@dataclass(frozen=True)
class Story:
    text: str
    thing: str
    pronoun: str
    start: int
    changes: list[int]


def make_story(rng: random.Random, steps: int) -> Story:
    """ "Mia has 7 pens. She buys 5 more. Then she loses 3." with its numbers."""
    (name, pronoun), thing = rng.choice(NAMES), rng.choice(OBJECTS)
    start = rng.randint(*STORY_START)
    changes = changes_keeping_nonnegative(rng, start, steps, *STORY_CHANGE)
    sentences = [f"{name} has {start} {thing}."]
    for i, change in enumerate(changes):
        verb = rng.choice(GAINS if change >= 0 else LOSSES).format(n=abs(change))
        sentences.append(f"{pronoun if i == 0 else 'Then ' + pronoun.lower()} {verb}.")
    return Story(" ".join(sentences), thing, pronoun.lower(), start, changes)


def recall(rng: random.Random, steps: int = 2) -> Row:
    """The story's language without its arithmetic: the answer is the starting count."""
    told = make_story(rng, steps)
    return {
        "question": f"{told.text} How many {told.thing} did {told.pronoun} have at the start?",
        "answer": f"At the start: {told.start}\n#### {told.start}",
    }


def story(rng: random.Random, steps: int = 2) -> Row:
    """The held-back skill: apply the story's changes, one chain line each."""
    told = make_story(rng, steps)
    return {
        "question": f"{told.text} How many {told.thing} does {told.pronoun} have now?",
        "answer": answer_with_chain(told.start, told.changes),
    }


def together(rng: random.Random) -> Row:
    """Two people's counts of one thing, added: the story's words in a new question."""
    (first, _), (second, _) = rng.sample(NAMES, 2)
    thing = rng.choice(OBJECTS)
    a, b = rng.randint(*STORY_START), rng.randint(*STORY_START)
    return {
        "question": f"{first} has {a} {thing} and {second} has {b} {thing}. How many {thing} do they have together?",
        "answer": answer_with_chain(a, [b]),
    }


SKILLS: dict[str, Callable[[random.Random], Row]] = {
    "arithmetic": arithmetic,
    "compare": compare,
    "smaller": smaller,
    "recall": recall,
    "story": story,
    "smallest": smallest,
    "together": together,
}
# Skill -> share of the pretraining corpus. Arithmetic is the hard one (compare and recall are learned
# within a few hundred steps), so it gets half the rows.
PRETRAINING_MIX = {"arithmetic": 2.0, "compare": 1.0, "recall": 1.0}
FINE_TUNING_SKILL = "story"
# The stages of recipes/quickstart-continual.yaml, in order.
CONTINUAL_SKILLS = ("story", "smallest", "together")
# Skills the task folders hold training rows for; the others are scored only.
TRAINED_SKILLS = {FINE_TUNING_SKILL, *CONTINUAL_SKILLS}


def rows(mix: dict[str, float], count: int, seed: int) -> list[Row]:
    """count rows, each from a skill drawn with the mix's weights; the same for the same seed."""
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    return [SKILLS[rng.choices(names, weights)[0]](rng) for _ in range(count)]


def distinct_rows(skill: str, count: int, rng: random.Random, exclude: set[str]) -> list[Row]:
    """count rows whose questions are new (not in exclude, not repeated); exclude gains them."""
    found: list[Row] = []
    for _ in range(100 * count):
        if len(found) == count:
            break
        row = SKILLS[skill](rng)
        if row["question"] not in exclude:
            exclude.add(row["question"])
            found.append(row)
    if len(found) < count:
        raise ValueError(f"skill {skill} has too few distinct questions for {count} more rows")
    return found


def write_task(out_dir: Path, skill: str, train_size: int, test_size: int, seed: int) -> Path:
    """A GSM8K-layout folder (train.jsonl, test.jsonl) for one skill; no test question appears in train."""
    rng, seen = random.Random(f"{skill}-{seed}"), set[str]()
    test = distinct_rows(skill, test_size, rng, seen)
    train = distinct_rows(skill, train_size, rng, seen)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in split))
    return out_dir


def write_tasks(root: Path, seed: int, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE) -> Path:
    """root/<skill>/{train,test}.jsonl for every skill; only the held-back skills have training rows.

    The other folders score the base on each skill, 0-shot (a test question of a pretraining skill may
    also be in the pretraining corpus: there are only 930 distinct comparisons).
    """
    for skill in SKILLS:
        write_task(Path(root) / skill, skill, train_size if skill in TRAINED_SKILLS else 0, test_size, seed)
    return Path(root)
