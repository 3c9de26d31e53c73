"""Token-level perplexity of a text dataset, each document scored in windows of at most max_length tokens.

A document's tokens 1..n-1 are scored in chunks of `stride` tokens; each chunk is predicted from up to
max_length tokens before it. With stride = max_length the chunks do not overlap (each chunk restarts its
context); a smaller stride re-reads context so every token after the first window sees at least
max_length - stride tokens. Token 0 (the BOS a Llama-style tokenizer adds) is context only.
"""

import math

from sharelora_cli.config.recipe import PerplexityTaskConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.engine import Engine
from sharelora_cli.evaluation.results import TaskResult
from sharelora_cli.evaluation.sources import read_rows


def windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(context start, first scored token, end) triples that score tokens 1..num_tokens-1 exactly once."""
    spans = []
    for first in range(1, num_tokens, stride):
        end = min(first + stride, num_tokens)
        spans.append((max(0, end - 1 - max_length), first, end))
    return spans


def load_texts(cfg: PerplexityTaskConfig, limit: int | None) -> list[str]:
    if cfg.path is None:
        raise UserError("perplexity needs a dataset: pass --data PATH (.txt/.jsonl/...) or set eval.perplexity.path")
    rows = read_rows(cfg.path, cfg.split)[:limit]
    if not rows:
        raise UserError(f"eval.perplexity.path: {cfg.path} has no rows")
    if cfg.field not in rows[0]:
        raise UserError(
            f"{cfg.path} rows have no field '{cfg.field}' (fields: {', '.join(sorted(rows[0]))}); pass --text-field"
        )
    return [str(row[cfg.field]) for row in rows]


def evaluate(engine: Engine, cfg: PerplexityTaskConfig, limit: int | None) -> TaskResult:
    stride = cfg.stride or engine.max_length
    if stride > engine.max_length:
        raise UserError(f"eval.perplexity.stride={stride} exceeds the context window max_length={engine.max_length}")
    texts = load_texts(cfg, limit)
    documents = [engine.encode(text) for text in texts]
    pairs, owner = [], []
    for index, ids in enumerate(documents):
        for start, first, end in windows(len(ids), engine.max_length, stride):
            pairs.append((ids[start:first], ids[first:end]))
            owner.append(index)
    scores = engine.loglikelihood_tokens(pairs)
    nll = [0.0] * len(documents)
    for index, score in zip(owner, scores):
        nll[index] -= score.logprob
    records = [
        {"index": i, "tokens": len(ids) - 1, "nll": nll[i], "perplexity": _exp(nll[i], len(ids) - 1)}
        for i, ids in enumerate(documents)
    ]
    total_nll, total_tokens = sum(nll), sum(len(ids) - 1 for ids in documents)
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    metrics = {
        "token_perplexity": _exp(total_nll, total_tokens),
        "nll_per_token": total_nll / total_tokens if total_tokens else 0.0,
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else 0.0,
        "num_tokens": total_tokens,
        "num_documents": len(documents),
    }
    return TaskResult(metrics, records)


def _exp(nll: float, tokens: int) -> float | None:
    """exp(mean NLL); None (JSON null) for a document too short to score."""
    return math.exp(nll / tokens) if tokens else None
