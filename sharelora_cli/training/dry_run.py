"""`sharelora train --dry-run`: the resolved recipe, the data summary line and one training example as the run
would see them, then stop: no model weights load, nothing is written and output_dir is not locked."""

from collections.abc import Callable
from typing import Any

from sharelora_cli.config.recipe import Recipe, stage_name, to_yaml
from sharelora_cli.data.example_view import example_view
from sharelora_cli.training.data_plan import plan_data
from sharelora_cli.training.loop import check_output_dir, dynamo_plugin
from sharelora_cli.training.stages import check_output_dir as check_stages_output_dir
from sharelora_cli.training.stages import stage_run


def dry_run(recipe: Recipe, processes: int, say: Callable[[str], Any]) -> None:
    """Print what `train` would do with this recipe over `processes` processes; raise the errors it would raise first.

    A recipe with stages gets each stage's data line and example, under the stage's name.
    """
    say(to_yaml(recipe).rstrip("\n"))
    if not recipe.stages:
        check_output_dir(recipe)
        return show_data(recipe, processes, say)
    check_stages_output_dir(recipe)
    for index in range(len(recipe.stages)):
        say(f"{stage_name(recipe, index)}:")
        show_data(stage_run(recipe, index), processes, say)


def show_data(recipe: Recipe, processes: int, say: Callable[[str], Any]) -> None:
    """The data summary line and the first example step 1 trains on."""
    dynamo_plugin(recipe.train)  # refuses train.cuda_graphs without compile or without CUDA, as train does
    plan = plan_data(recipe, processes, 0, say)
    first = plan.sampler.micro_batches(0)[0][0]
    say(example_view(plan.splits.train[first], plan.tokenizer, "the first of step 1"))
