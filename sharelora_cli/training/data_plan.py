"""What a run trains on, decided before any model loads: tokenizer, splits, steps and the step sampler.

`train` and `train --dry-run` both go through plan_data, so a dry run reports the data, the steps and the
data errors exactly as the run would.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sharelora_cli.config.recipe import Recipe
from sharelora_cli.core.errors import UserError
from sharelora_cli.data.data_summary import data_line, length_losses, resolved_steps
from sharelora_cli.data.examples import Splits, StepSampler, build_splits
from sharelora_cli.models.loading import load_tokenizer


@dataclass
class DataPlan:
    recipe: Recipe  # train.max_steps resolved from train.num_epochs
    tokenizer: Any
    splits: Splits
    sampler: StepSampler


def plan_data(recipe: Recipe, processes: int, rank: int, say: Callable[[str], Any]) -> DataPlan:
    """Load the tokenizer and data, resolve the steps and say the data summary line (before the sampler can refuse)."""
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code)
    splits = build_splits(recipe.data, tokenizer, recipe.train.seed)
    recipe = with_resolved_steps(recipe, len(splits.train), processes)
    cfg = recipe.train
    global_batch = cfg.batch_size * cfg.grad_accum * processes
    say(data_line(splits.stats, recipe.data, cfg.max_steps, global_batch, len(splits.train)))
    return DataPlan(recipe, tokenizer, splits, make_sampler(splits, recipe, processes, rank))


def with_resolved_steps(recipe: Recipe, train_units: int, processes: int) -> Recipe:
    """The recipe with train.max_steps set to what train.num_epochs means for this data (unchanged without it)."""
    steps = resolved_steps(recipe.train, train_units, processes)
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": steps})})


def make_sampler(splits: Splits, recipe: Recipe, processes: int, rank: int) -> StepSampler:
    """The step sampler; a global batch larger than the data also says which rows the length limit took."""
    cfg = recipe.train
    try:
        return StepSampler(len(splits.train), cfg.batch_size, cfg.grad_accum, processes, rank, cfg.seed)
    except UserError as err:
        losses = length_losses(splits.stats, recipe.data.max_length)
        if not losses:
            raise
        raise UserError(f"{err} (of {splits.stats.rows} rows: {'; '.join(losses)})") from None
