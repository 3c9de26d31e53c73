"""The line a run prints before training: what the rows became, and how many epochs the steps make.

data: 300 rows from train.jsonl -> 288 examples (12 dropped: longer than data.max_length=256, 260-410 tokens);
259 train / 29 validation; 30 steps x 4 examples = 0.46 epochs
"""

import math

from sharelora_cli.config.recipe import DataConfig, TrainConfig
from sharelora_cli.data.examples import DataStats


def steps_for_epochs(num_epochs: float, train_units: int, global_batch: int) -> int:
    """Optimizer steps that cover num_epochs passes over the training examples (the last step may run over)."""
    return max(1, math.ceil(num_epochs * train_units / global_batch))


def resolved_steps(cfg: TrainConfig, train_units: int, processes: int) -> int:
    """train.max_steps, or the steps train.num_epochs means for this data and global batch."""
    if cfg.num_epochs is None:
        return cfg.max_steps
    return steps_for_epochs(cfg.num_epochs, train_units, cfg.batch_size * cfg.grad_accum * processes)


def length_losses(stats: DataStats, max_length: int) -> list[str]:
    """The rows dropped, cut or (packed) split for length, with their token lengths."""
    parts = []
    for lengths, what in (
        (stats.dropped_lengths, "dropped"),
        (stats.truncated_lengths, "truncated"),
        (stats.split_lengths, "split across blocks"),
    ):
        if lengths:
            parts.append(
                f"{len(lengths)} {what}: longer than data.max_length={max_length}, {min(lengths)}-{max(lengths)} tokens"
            )
    if stats.no_target:
        parts.append(f"{stats.no_target} without an answer token left")
    return parts


def data_line(stats: DataStats, data: DataConfig, steps: int, global_batch: int, train_units: int) -> str:
    """The data summary; train_units: training examples, or packed blocks with data.packing."""
    losses = length_losses(stats, data.max_length)
    made = f"{stats.rows} rows from {data.path} -> {stats.examples} examples" + (
        f" ({'; '.join(losses)})" if losses else ""
    )
    split = f"{stats.train_examples} train / {stats.validation_examples} validation"
    if data.packing:
        split += (
            f", packed ({data.packing_mode()}) into {train_units} training blocks of up to {data.max_length} tokens"
        )
    unit = "blocks" if data.packing else "examples"
    epochs = steps * global_batch / train_units
    return f"data: {made}; {split}; {steps} steps x {global_batch} {unit} = {epochs:.2f} epochs"
