"""Training data: rows from a file or the hub -> tokenized, loss-masked examples -> batches.

Every bad-data condition is found here, before any model is loaded, and reported as one line
naming the file and the field.

An example's text is tokenized whole, and the prompt/answer boundary is found from the tokens'
character offsets: tokenizing the prompt and the answer apart can give other tokens at the join
than the whole text does (SentencePiece adds a word-start marker to the answer's first token), so
training would teach tokens the model never sees when it generates.
"""

import bisect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sharelora_cli.config.recipe import DataConfig
from sharelora_cli.core.errors import UserError, first_line

IGNORE_INDEX = -100
LOCAL_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
REQUIRED_FIELDS = {
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "text": ("text",),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # The data row it came from (for a packed block, the row it starts in), so errors can name it.
    row: int | None = None
    # Packed blocks only: each token's position in its own example, restarting at 0 where the next one starts.
    position_ids: list[int] | None = None


@dataclass
class DataStats:
    """What the rows became: read, dropped, truncated or split across blocks for length (and how long they were)."""

    rows: int = 0
    # Token lengths of the rows data.overlength=drop left out, and of the rows it cut to max_length.
    dropped_lengths: list[int] = field(default_factory=list)
    truncated_lengths: list[int] = field(default_factory=list)
    # With packing (and data.overlength=error): the token lengths of the rows longer than a block, split across blocks.
    split_lengths: list[int] = field(default_factory=list)
    # Rows left without a trained token (an answer that data.overlength=truncate cut off entirely).
    no_target: int = 0
    examples: int = 0
    train_examples: int = 0
    validation_examples: int = 0


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    stats: DataStats = field(default_factory=DataStats)


def build_splits(cfg: DataConfig, tokenizer, seed: int) -> Splits:
    """Load, check, tokenize and split the data deterministically (the split depends only on seed)."""
    rows = load_rows(cfg)
    stats = DataStats(rows=len(rows))
    examples = [ex for i, row in enumerate(rows) if (ex := _to_example(row, i, cfg, tokenizer, stats)) is not None]
    if not examples:
        raise UserError(f"data.path {cfg.path}: no example fits data.max_length={cfg.max_length}: {_lost(stats)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(len(examples) * cfg.validation_fraction)
    if cfg.validation_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(examples):
        raise UserError(
            f"data.path {cfg.path}: {len(examples)} examples leave none for training; lower data.validation_fraction"
        )
    train = [examples[i] for i in order[n_val:]]
    validation = [examples[i] for i in order[:n_val]]
    stats.examples, stats.train_examples, stats.validation_examples = len(examples), len(train), len(validation)
    if mode := cfg.packing_mode():
        packer = pack_best_fit if mode == "best_fit" else pack
        # Validation is packed like training, so it too stays within max_length and the positions trained on.
        train, validation = packer(train, cfg.max_length), packer(validation, cfg.max_length)
        if not train:
            raise UserError(
                f"data.max_length={cfg.max_length} leaves no packed block with a trained token; raise data.max_length"
            )
    return Splits(train, validation, stats)


def _lost(stats: DataStats) -> str:
    """Why every row was lost, with the lengths to compare against max_length."""
    parts = []
    if stats.dropped_lengths:
        lengths = stats.dropped_lengths
        parts.append(
            f"{len(lengths)} of {stats.rows} rows dropped as longer ({min(lengths)}-{max(lengths)} tokens); "
            "raise data.max_length or set data.overlength=truncate"
        )
    if stats.no_target:
        parts.append(
            f"{stats.no_target} of {stats.rows} rows have no answer token left within it; raise data.max_length"
        )
    return "; ".join(parts)


def load_rows(cfg: DataConfig) -> list[dict]:
    """Rows as dicts from a local json/jsonl/csv/parquet file or a hub dataset id."""
    import datasets

    path = Path(cfg.path)
    loader = LOCAL_LOADERS.get(path.suffix.lower())
    if path.exists() and not path.is_file():
        raise UserError(f"data.path {path} is a directory; give a .json, .jsonl, .csv or .parquet file")
    if loader is None and (path.suffix or path.is_absolute() or cfg.path.startswith(".")):
        if not path.exists():
            raise UserError(f"data.path {path} not found")
        raise UserError(f"data.path {path}: unsupported file type; use .json, .jsonl, .csv or .parquet")
    if loader and not path.is_file():
        raise UserError(f"data.path {path} not found")
    if loader and path.stat().st_size == 0:
        raise UserError(f"data.path {path} is empty")
    if path.suffix.lower() == ".jsonl":
        _check_json_lines(path)  # datasets would name neither the line nor the fix, and log pyarrow's message
    datasets.disable_progress_bars()
    try:
        if loader:
            dataset = datasets.load_dataset(loader, data_files=str(path), split="train")
        else:
            dataset = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
    except Exception as err:  # datasets raises many types for unreadable files and unknown ids
        raise UserError(f"data.path {cfg.path}: cannot read it ({first_line(err)})") from None
    rows = dataset.to_list()
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    if not rows:
        raise UserError(f"data.path {cfg.path} has no rows")
    return rows


def _check_json_lines(path: Path) -> None:
    """Refuse a JSON Lines file at its first line that is no JSON object, naming it as file:line."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\n"))
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); each line must be one JSON "
                    "object: fix or remove that line"
                ) from None
            if not isinstance(value, dict):
                raise UserError(f"{path}:{number}: a JSON {type(value).__name__}, not an object; each line must be one")


def _to_example(row: dict, index: int, cfg: DataConfig, tokenizer, stats: DataStats) -> Example | None:
    for name in REQUIRED_FIELDS[cfg.format]:
        if row.get(name) in (None, ""):
            raise UserError(
                f"data.path {cfg.path}: row {index + 1} has no field '{name}' "
                f"(data.format={cfg.format} needs {', '.join(REQUIRED_FIELDS[cfg.format])}){_format_hint(row)}"
            )
    input_ids, labels = _tokenize(_segments(row, cfg.format, tokenizer), tokenizer, cfg)
    if cfg.format != "chat":
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    # Packing splits a long example across blocks instead, unless data.overlength asks to truncate or drop it.
    split = bool(cfg.packing) and cfg.overlength == "error"
    if len(input_ids) > cfg.max_length and split:
        stats.split_lengths.append(len(input_ids))
    if len(input_ids) > cfg.max_length and not split:
        if cfg.overlength == "error":
            raise UserError(
                f"data.path {cfg.path}: row {index + 1} has {len(input_ids)} tokens, more than "
                f"data.max_length={cfg.max_length}; raise data.max_length or set data.overlength=truncate or drop"
            )
        if cfg.overlength == "drop":
            stats.dropped_lengths.append(len(input_ids))
            return None
        stats.truncated_lengths.append(len(input_ids))
        input_ids, labels = input_ids[: cfg.max_length], labels[: cfg.max_length]
    if all(label == IGNORE_INDEX for label in labels):
        stats.no_target += 1
        return None
    return Example(input_ids, labels, index)


def _format_hint(row: dict) -> str:
    """Which data.format the row's fields fit, when it is another one."""
    fits = [fmt for fmt, names in REQUIRED_FIELDS.items() if all(row.get(name) not in (None, "") for name in names)]
    return f"; its fields fit data.format={fits[0]}: set that" if fits else f"; the row has {', '.join(map(str, row))}"


def _tokenize(segments: list[tuple[str, bool]], tokenizer, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole text; with data.mask_prompt, only tokens overlapping a trained piece are labelled."""
    text = "".join(piece for piece, _ in segments)
    encoded = tokenizer(
        text, add_special_tokens=adds_special_tokens(cfg.format), return_offsets_mapping=cfg.mask_prompt
    )
    input_ids = list(encoded["input_ids"])
    if not cfg.mask_prompt:
        return input_ids, list(input_ids)
    if "offset_mapping" not in encoded:  # Python ("slow") tokenizers silently return none
        raise UserError(
            "data.mask_prompt needs a fast tokenizer (one with character offsets) to find where answers start; "
            "model.name_or_path has a slow one: use a model with a tokenizer.json, or set data.mask_prompt=false"
        )
    trained, start = [], 0
    for piece, is_trained in segments:
        if is_trained:
            trained.append((start, start + len(piece)))
        start += len(piece)
    # A token is trained if it covers any trained character; special tokens the tokenizer adds cover none.
    return input_ids, [
        token if any(begin < stop and end > first for first, stop in trained) else IGNORE_INDEX
        for token, (begin, end) in zip(input_ids, encoded["offset_mapping"])
    ]


def adds_special_tokens(fmt: str) -> bool:
    """Whether the tokenizer adds its special tokens (bos): chat templates write their own, the other formats get them."""
    return fmt != "chat"


def _segments(row: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_trained_on) pieces of one example; prompts are not trained on."""
    if fmt == "gsm8k":
        return [(gsm8k_prompt(row["question"]), False), (f" {row['answer']}", True)]
    if fmt == "alpaca":
        return [(alpaca_prompt(row["instruction"], row.get("input") or ""), False), (str(row["output"]), True)]
    if fmt == "chat":
        return _chat_segments(row["messages"], tokenizer)
    return [(str(row["text"]), True)]


def gsm8k_prompt(question: str) -> str:
    """The same "Question: ...\nAnswer:" format as lm-evaluation-harness's gsm8k task."""
    return f"Question: {question}\nAnswer:"


def alpaca_prompt(instruction: str, extra: str = "") -> str:
    input_block = f"### Input:\n{extra}\n\n" if extra else ""
    return ALPACA_PROMPT.format(instruction=instruction, input_block=input_block)


def prompt_in_format(prompt: str, fmt: str, tokenizer) -> str:
    """A user's prompt rendered as the prompt of a training example of data.format `fmt` (chat: one user turn)."""
    if fmt == "gsm8k":
        return gsm8k_prompt(prompt)
    if fmt == "alpaca":
        return alpaca_prompt(prompt)
    if fmt == "chat":
        _require_chat_template(tokenizer)
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format=chat needs a tokenizer with a chat template (model.name_or_path has none)")


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; only assistant turns are trained on."""
    _require_chat_template(tokenizer)
    segments, rendered = [], ""
    for i, message in enumerate(messages):
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if message.get("role") == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            segments.append((prompt[len(rendered) :], False))
            segments.append((full[len(prompt) :], True))
        else:
            segments.append((full[len(rendered) :], False))
        rendered = full
    return [(text, trained) for text, trained in segments if text]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples and cut the stream into max_length blocks; the last block keeps the remainder.

    A block holds pieces: whole examples, or the parts of one that a cut left in it. Position ids restart
    at 0 at each piece, which (without an attention mask) makes transformers attend within pieces only,
    so a block's loss is the sum of its pieces' losses computed alone. A piece's first token is no target:
    alone, nothing precedes it. A block left without targets (cut from inside a long masked prompt)
    carries no training signal and is dropped.
    """
    ids = [token for ex in examples for token in ex.input_ids]
    labels = [label for ex in examples for label in ex.labels]
    owners = [k for k, ex in enumerate(examples) for _ in ex.input_ids]
    cuts = range(0, len(ids), max_length)
    blocks = [
        _block(ids[i : i + max_length], labels[i : i + max_length], owners[i : i + max_length], examples) for i in cuts
    ]
    return [block for block in blocks if any(label != IGNORE_INDEX for label in block.labels)]


def pack_best_fit(examples: list[Example], max_length: int) -> list[Example]:
    """Place whole examples into max_length blocks (best fit decreasing); only an example longer than a block is split.

    Unlike `pack`, no block starts in the middle of an example, so no answer is trained without its prompt.
    Each example is a piece of its block with position ids restarting at 0, as in `pack`; a longer one is
    split into pieces (`_pieces`) placed like examples. A piece without a target (cut from a long masked
    prompt) is left out.
    """
    pieces = [piece for ex in examples for piece in _pieces(ex, max_length)]
    pieces = [piece for piece in pieces if any(label != IGNORE_INDEX for label in piece.labels[1:])]
    blocks = []
    for members in best_fit([len(piece.input_ids) for piece in pieces], max_length):
        ids = [token for k in members for token in pieces[k].input_ids]
        labels = [label for k in members for label in pieces[k].labels]
        owners = [k for k in members for _ in pieces[k].input_ids]
        blocks.append(_block(ids, labels, owners, pieces))
    return blocks


def _pieces(example: Example, max_length: int) -> list[Example]:
    """The example, or if longer than max_length, max_length pieces of it overlapping by one token.

    A piece's first token is no target (its position restarts at 0): starting each piece at the previous
    one's last token, where it was a target, trains every target of the example exactly once.
    """
    n = len(example.input_ids)
    if n <= max_length:
        return [example]
    step = max(max_length - 1, 1)
    return [
        Example(example.input_ids[i : i + max_length], example.labels[i : i + max_length], example.row)
        for i in range(0, n - 1, step)
    ]


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest item first, each into the fullest bin with room for it, else a new bin.

    Uses at most 11/9 of the fewest bins possible, plus 4 (Johnson et al., 1974). The free spaces are kept
    sorted with the bins that have each, so an item finds its bin by bisection, not by a scan of every bin.
    """
    bins: list[list[int]] = []
    spaces: list[int] = []  # the distinct free spaces of open bins, sorted
    bins_with: dict[int, list[int]] = {}  # free space -> the bins that have it
    for item in sorted(range(len(lengths)), key=lambda k: -lengths[k]):  # stable: ties keep the data order
        at = bisect.bisect_left(spaces, lengths[item])
        if at < len(spaces):
            space = spaces[at]
            target = bins_with[space].pop()
            if not bins_with[space]:
                del bins_with[space], spaces[at]
        else:
            space, target = capacity, len(bins)
            bins.append([])
        bins[target].append(item)
        left = space - lengths[item]
        if left:
            if left not in bins_with:
                bisect.insort(spaces, left)
            bins_with.setdefault(left, []).append(target)
    return bins


def _block(ids: list[int], labels: list[int], owners: list[int], examples: list[Example]) -> Example:
    """One packed block; owners[i] is the index of the example token i comes from."""
    positions: list[int] = []
    for i, owner in enumerate(owners):
        positions.append(positions[-1] + 1 if i and owners[i - 1] == owner else 0)
    labels = [IGNORE_INDEX if position == 0 else label for label, position in zip(labels, positions)]
    return Example(ids, labels, examples[owners[0]].row, positions)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded positions are masked from attention and loss.

    attention_mask marks real tokens. A batch of packed blocks also carries position_ids (restarting at 0
    for each packed example; padding counts as one more example), which the model is given instead of
    the attention mask: see train.model_inputs.
    """
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if any(ex.position_ids is not None for ex in examples):
        batch["position_ids"] = _packed_positions(examples, width)
    return batch


def _packed_positions(examples: list[Example], width: int) -> torch.Tensor:
    """Each block's position ids, then its padding as one more example of its own (0, 1, ...)."""
    rows = []
    for ex in examples:
        own = ex.position_ids if ex.position_ids is not None else list(range(len(ex.input_ids)))
        rows.append(own + list(range(width - len(own))))
    return torch.tensor(rows, dtype=torch.long)


class StepSampler:
    """Which examples each process uses at each optimizer step, derived from the step alone.

    The examples form an endless stream of seeded per-epoch permutations; step s takes the
    next global batch (batch_size x grad_accum x world_size) from it. Resuming needs only the
    step, and any split of the global batch across processes or accumulation sees the same
    examples.
    """

    def __init__(self, num_examples: int, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int):
        self.num_examples = num_examples
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_batch = batch_size * grad_accum * world_size
        if self.global_batch > num_examples:
            raise UserError(
                f"train.batch_size x train.grad_accum x processes = {self.global_batch} exceeds the "
                f"{num_examples} training examples; lower train.batch_size or train.grad_accum"
            )
        self._epoch, self._perm = -1, list[int]()

    def micro_batches(self, step: int) -> list[list[int]]:
        """grad_accum lists of example indices for this process at this step."""
        start = step * self.global_batch
        stream = [self._index(start + i) for i in range(self.global_batch)]
        return [
            stream[(m * self.world_size + self.rank) * self.batch_size :][: self.batch_size]
            for m in range(self.grad_accum)
        ]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_examples

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=generator).tolist()
        return self._perm[offset]
