"""GSM8K: few-shot chain-of-thought prompts, greedy generation, scored as lm-evaluation-harness scores it.

The prompt is lm-evaluation-harness's `gsm8k` format: "Question: ...\\nAnswer: <worked solution>" shots,
separated by blank lines, the solutions ending in "#### N". Shots are the first `num_fewshot` rows of the
train split (the harness's `first_n` sampler), the same for every question.

Scores are the harness's two filters of its `gsm8k` task (lm_eval 0.4, tasks/gsm8k/gsm8k.yaml), each
followed by the task's exact_match against the whole reference solution:
- `strict-match`: the first "#### N" of the output;
- `flexible-extract`: the last number-like span of the output.
Either gives "[invalid]" when its regex finds nothing, which matches no GSM8K reference. exact_match removes
",", "$", everything up to the last "#### " and a final "." from both sides, lower-cases, and compares.
`exact_match` is sharelora's earlier score (strict-match's answer, else flexible-extract's), kept so
existing results files keep their key; papers quote one of the harness's two.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharelora_cli.config.recipe import GSM8KTaskConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.engine import Engine
from sharelora_cli.evaluation.results import TaskResult
from sharelora_cli.evaluation.sources import first_rows, is_local, read_hub, read_local

STOP_SEQUENCES = ["Question:", "</s>", "<|im_end|>"]
INVALID = "[invalid]"
# metric name -> (regex, which match: 0 the first, -1 the last), as in the harness's filter_list.
FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
# exact_match's regexes_to_ignore, removed from prediction and reference in this order.
IGNORED = [re.compile(pattern) for pattern in (r",", r"\$", r"(?s).*#### ", r"\.$")]


def load_split(path: str, split: str) -> list[dict]:
    """Rows with question and answer: PATH/<split>.jsonl for a local folder, else the hub dataset's split."""
    rows = read_local(Path(path) / f"{split}.jsonl") if is_local(path) else read_hub(path, split, name="main")
    if rows and not {"question", "answer"} <= rows[0].keys():
        raise UserError(f"GSM8K data at {path} ({split}) needs fields question and answer, found {sorted(rows[0])}")
    return rows


def format_question(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def build_prompt(question: str, shots: list[dict]) -> str:
    examples = "".join(f"{format_question(shot['question'])} {shot['answer']}\n\n" for shot in shots)
    return examples + format_question(question)


@dataclass(frozen=True)
class PromptFormat:
    """How questions are put to the model: the prompt from a question and the shots, and where generation stops."""

    render: Callable[[str, list[dict]], str]
    stop: list[str]
    # False for a chat template's text, which holds its own special tokens (as training tokenizes it).
    special_tokens: bool = True


HARNESS = PromptFormat(build_prompt, STOP_SEQUENCES)


def extract(output: str, metric: str) -> str:
    """The answer a harness filter takes from a generation: its regex's chosen match, stripped, else "[invalid]"."""
    pattern, which = FILTERS[metric]
    matches = pattern.findall(output)
    if not matches:
        return INVALID
    match = matches[which]
    if isinstance(match, tuple):  # several groups: the first that matched
        match = next((group for group in match if group), INVALID)
    return match.strip()


def normalize(text: str) -> str:
    """exact_match's normalisation of a prediction or a reference.

    Done on a one-element numpy array, as the harness does: numpy drops trailing NUL characters and
    lower-cases within the array's width ("İ" becomes "i", not the two characters str.lower gives).
    """
    texts = np.array([text])
    for pattern in IGNORED:
        texts = np.array([pattern.sub("", item) for item in texts])
    return str(np.char.lower(texts)[0])


def is_correct(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def score(output: str, reference: str) -> dict:
    """Per-sample record fields: each harness metric's answer and verdict, and the earlier exact_match's."""
    record: dict = {}
    for metric in FILTERS:
        answer = extract(output, metric)
        record[metric] = {"extracted": answer, "correct": is_correct(answer, reference)}
    strict, flexible = record["strict-match"]["extracted"], record["flexible-extract"]["extracted"]
    answer = strict if strict != INVALID else flexible
    record["extracted"] = None if answer == INVALID else answer
    record["correct"] = answer != INVALID and is_correct(answer, reference)
    return record


def evaluate(engine: Engine, cfg: GSM8KTaskConfig, limit: int | None, prompt: PromptFormat = HARNESS) -> TaskResult:
    shots = few_shot(cfg)
    docs = load_split(cfg.path, "test")[:limit]
    prompts = [prompt.render(doc["question"], shots) for doc in docs]
    outputs = engine.generate(prompts, prompt.stop, cfg.max_new_tokens, special_tokens=prompt.special_tokens)
    records = [
        {"prompt": prompt, "output": output, "target": normalize(doc["answer"]), **score(output, doc["answer"])}
        for doc, prompt, output in zip(docs, prompts, outputs)
    ]
    metrics = {metric: accuracy([r[metric]["correct"] for r in records]) for metric in FILTERS}
    metrics["exact_match"] = accuracy([r["correct"] for r in records])
    return TaskResult({**metrics, "num_samples": len(records)}, records)


def few_shot(cfg: GSM8KTaskConfig) -> list[dict]:
    """The first num_fewshot rows of the train split; 0-shot reads no train split, so a folder may lack one."""
    if cfg.num_fewshot == 0:
        return []
    source = f"{Path(cfg.path) / 'train.jsonl'}" if is_local(cfg.path) else f"dataset {cfg.path} (train split)"
    return first_rows(load_split(cfg.path, "train"), cfg.num_fewshot, source, "eval.gsm8k.num_fewshot")


def accuracy(verdicts: list[bool]) -> float:
    return sum(verdicts) / len(verdicts) if verdicts else 0.0
