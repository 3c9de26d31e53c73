"""The one engine every task runs on: batched log-likelihood and batched generation for a causal LM.

Both pad on the left, so every row of a batch ends at the same position: generation appends new tokens
there with the KV cache, and log-likelihood keeps only the last logits (`logits_to_keep`) instead of a
(batch, length, vocab) tensor. Position ids follow the attention mask, so padding never shifts a token's
position. Requests run longest first: the first batch is the biggest, so an out-of-memory shows at once.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from accelerate.utils import find_executable_batch_size
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")
R = TypeVar("R")

BatchSize = int | Literal["auto"]
CPU_AUTO_BATCH = 8  # no cheap out-of-memory signal on CPU; a size that keeps 2-core machines responsive
CUDA_START_BATCH = 64
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Score:
    """Log-probability of a continuation, and whether greedy decoding would have produced it."""

    logprob: float
    greedy: bool


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float


def context_window(model: nn.Module, override: int | None) -> int:
    """Tokens the model attends over: the override, else max_position_embeddings (or n_positions)."""
    if override:
        return override
    config = model.config
    return (
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or DEFAULT_MAX_LENGTH
    )


class Engine:
    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: BatchSize, max_length: int
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = next(model.parameters()).device

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids, with the special tokens the tokenizer adds by default (BOS for Llama-style tokenizers)
        unless special_tokens is False: a chat template writes its own, as training tokenizes chat text."""
        return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split from the encoding of the whole text.

        Trailing spaces move from the context to the continuation and the whole string is encoded once,
        so a continuation like " A" gets the token it would have in running text.
        """
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        whole = self.encode(stripped + continuation)
        context_ids = self.encode(stripped)
        return context_ids, whole[len(context_ids) :]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Score]:
        """Score each (context, continuation) pair of strings."""
        return self.loglikelihood_tokens([self.encode_pair(context, cont) for context, cont in pairs])

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        """Score continuation ids after context ids; the context is cut from the left to fit max_length."""
        inputs = [tuple((context + continuation)[-(self.max_length + 1) :][:-1]) for context, continuation in pairs]
        # Pairs with the same model input (e.g. one question, four one-token answers) share a forward pass,
        # which keeps logits for the longest continuation scored on it.
        needed: dict[tuple[int, ...], int] = {}
        for row, (_, continuation) in zip(inputs, pairs):
            needed[row] = max(needed.get(row, 1), min(len(continuation), len(row)))
        unique = list(needed.items())
        logprobs = dict(
            zip(needed, self._run_batched(unique, self._last_logprobs, lambda item: len(item[0]), "loglikelihood"))
        )
        scores = []
        for row, (_, continuation) in zip(inputs, pairs):
            target = torch.tensor(continuation[-len(row) :])
            scored = logprobs[row][-len(target) :]
            picked = scored.gather(1, target[:, None]).sum().item()
            scores.append(Score(picked, bool((scored.argmax(dim=1) == target).all())))
        return scores

    def generate(
        self,
        prompts: Sequence[str],
        until: Sequence[str],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        special_tokens: bool = True,
    ) -> list[str]:
        """Completions of each prompt, cut at the first stop string or EOS; greedy unless sampling is given.
        special_tokens: whether encoding adds the tokenizer's (see encode)."""
        until = [*until, *([self.tokenizer.eos_token] if self.tokenizer.eos_token else [])]
        keep = self.max_length - max_new_tokens
        if keep <= 0:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_length={self.max_length}"
            )
        rows = [tuple(self.encode(prompt, special_tokens)[-keep:]) for prompt in prompts]

        def run(batch: list[tuple[int, ...]]) -> list[str]:
            return self._generate_batch(batch, list(until), max_new_tokens, sampling)

        return [cut_at_stop(text, until) for text in self._run_batched(rows, run, len, "generate")]

    def _generate_batch(
        self, rows: list[tuple[int, ...]], until: list[str], max_new_tokens: int, sampling: Sampling | None
    ) -> list[str]:
        input_ids, attention_mask = self._left_pad(rows)
        options = (
            {"do_sample": False}
            if sampling is None
            else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        )
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                stop_strings=until,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                **options,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _last_logprobs(self, batch: list[tuple[tuple[int, ...], int]]) -> list[torch.Tensor]:
        """For each (input ids, n) the log-softmax over the vocabulary at the input's last n positions."""
        input_ids, attention_mask = self._left_pad([row for row, _ in batch])
        keep = max(n for _, n in batch)
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions(attention_mask),
                logits_to_keep=keep,
                use_cache=False,
            ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        return [logprobs[i, keep - n :] for i, (_, n) in enumerate(batch)]

    def _left_pad(self, rows: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + list(row) for row in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.device)
        return input_ids, attention_mask

    def _run_batched(
        self, items: Sequence[T], run: Callable[[list[T]], list[R]], length: Callable[[T], int], desc: str
    ) -> list[R]:
        """run() over batches of items, longest first, results back in the original order."""
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))

        def all_batches(batch_size: int) -> list[R]:
            results: list[R] = []
            with tqdm(total=len(order), desc=desc, disable=None, leave=False) as bar:
                for start in range(0, len(order), batch_size):
                    batch = [items[i] for i in order[start : start + batch_size]]
                    results.extend(run(batch))
                    bar.update(len(batch))
            return results

        if not order:
            return []
        if self.batch_size != "auto":
            ordered = all_batches(self.batch_size)
        elif self.device.type == "cuda":
            ordered = find_executable_batch_size(all_batches, starting_batch_size=CUDA_START_BATCH)()
        else:
            ordered = all_batches(CPU_AUTO_BATCH)
        results: list[R] = [None] * len(items)  # type: ignore[list-item]
        for index, result in zip(order, ordered):
            results[index] = result
        return results


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift positions."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """Text before the earliest stop string."""
    cuts = [index for index in (text.find(stop) for stop in until if stop) if index != -1]
    return text[: min(cuts)] if cuts else text
