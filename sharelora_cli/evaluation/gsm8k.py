"""GSM8K: few-shot chain-of-thought prompts, greedy generation, final-number exact match.

The prompt is lm-evaluation-harness's `gsm8k` format: "Question: ...\\nAnswer: <worked solution>" shots,
separated by blank lines, the solutions ending in "#### N". Shots are the first `num_fewshot` rows of the
train split (the harness's `first_n` sampler), the same for every question. The answer is the number after
"#### ", else the last number-like span (the harness's strict-match and flexible-extract regexes), compared
as a string after removing commas, "$", a trailing "." and case, as the harness's exact_match does.
"""

import re
from pathlib import Path

from sharelora_cli.errors import UserError
from sharelora_cli.evaluation.engine import Engine
from sharelora_cli.evaluation.results import TaskResult
from sharelora_cli.evaluation.sources import is_local, read_hub, read_local
from sharelora_cli.recipe import GSM8KTaskConfig

STOP_SEQUENCES = ["Question:", "</s>", "<|im_end|>"]
FINAL_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
ANY_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# Removed from prediction and reference before comparing, in this order.
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


def extract_answer(text: str) -> str | None:
    """The number after "#### ", else the last number in the text; None when there is none."""
    final = FINAL_ANSWER.search(text)
    if final:
        return final.group(1).strip()
    matches = ANY_NUMBER.findall(text)
    if not matches:
        return None
    return next(group for group in matches[-1] if group).strip()


def normalize(answer: str) -> str:
    for pattern in IGNORED:
        answer = pattern.sub("", answer)
    return answer.lower()


def evaluate(engine: Engine, cfg: GSM8KTaskConfig, limit: int | None) -> TaskResult:
    shots = load_split(cfg.path, "train")[: cfg.num_fewshot]
    docs = load_split(cfg.path, "test")[:limit]
    prompts = [build_prompt(doc["question"], shots) for doc in docs]
    outputs = engine.generate(prompts, STOP_SEQUENCES, cfg.max_new_tokens)
    records = []
    for doc, prompt, output in zip(docs, prompts, outputs):
        extracted = extract_answer(output)
        target = normalize(doc["answer"])
        correct = extracted is not None and normalize(extracted) == target
        records.append({"prompt": prompt, "output": output, "extracted": extracted, "target": target, "correct": correct})
    accuracy = sum(r["correct"] for r in records) / len(records) if records else 0.0
    return TaskResult({"exact_match": accuracy, "num_samples": len(records)}, records)
