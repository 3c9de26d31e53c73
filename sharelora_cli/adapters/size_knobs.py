"""Each method's size knob: the whole-number adapter setting that sets its trainable-parameter count, and the
value of it whose count is nearest a budget (scripts/method_study.py --depth-study holds every method to LoRA's
count at a rank).

Most methods grow with adapter.rank. VB-LoRA's logits grow with its bank, so it keeps LoRA's rank and turns
the bank's size. Adding a method is one entry in SIZE_KNOBS; a registered method without an entry is sized by
its rank, and where its rank does not move its count the study reports that it cannot reach the budget.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from torch import nn

from sharelora_cli.adapters.aslora import target_plan
from sharelora_cli.adapters.inject import plan_trainable, planned_plan
from sharelora_cli.config.recipe import AdapterConfig


@dataclass(frozen=True)
class Knob:
    """A whole-number setting of the recipe's adapter section, by its dotted path ("rank", "vblora.num_vectors")."""

    path: str
    minimum: int = 1
    # Beyond it a budget counts as out of reach; VeRA reaches LoRA r=8 on the deep base near rank 1,200.
    maximum: int = 16384
    # False where the count is not monotone in the setting (RandLoRA's falls with its basis rank, as the bases
    # grow more numerous, then rises once one basis covers the layer): every value up to maximum is counted.
    monotone: bool = True


RANK = Knob("rank")
SIZE_KNOBS: dict[str, Knob] = {
    "lora": RANK,
    "sharea": RANK,
    "shareb": RANK,
    "shareab": RANK,
    "aslora": RANK,
    "miss": RANK,
    "vera": RANK,
    "tied-lora": RANK,
    # top-k of the bank's vectors must exist: at least 2 with the default topk.
    "vblora": Knob("vblora.num_vectors", minimum=2),
    "lily": RANK,
    "unilora": Knob("unilora.vector_length", maximum=2**24),
    "tinylora": Knob("tinylora.u"),
    "randlora": Knob("rank", maximum=128, monotone=False),
}


def knob_of(method: str) -> Knob:
    return SIZE_KNOBS.get(method, RANK)


def with_knob(adapter: dict, knob: Knob, value: int) -> dict:
    """A copy of the adapter section with the knob's setting at value (nested sections copied, not shared)."""
    *sections, key = knob.path.split(".")
    result = dict(adapter)
    inner = result
    for section in sections:
        inner[section] = dict(inner.get(section, {}))
        inner = inner[section]
    inner[key] = value
    return result


def final_trainable(model: nn.Module, config: AdapterConfig) -> int:
    """Trainable parameters at the end of training (ASLoRA: after its merges), counted without creating tensors."""
    plan = planned_plan(model, config)
    return plan_trainable(config, target_plan(plan, config.aslora) if config.method == "aslora" else plan)


def nearest_value(count: Callable[[int], int], knob: Knob, budget: int) -> int:
    """The knob's value whose count is nearest budget (the smaller value on a tie).

    Where the count never falls as the knob grows (Knob.monotone), doubling and then bisecting finds where it crosses the budget in a few dozen counts even for ranks in the thousands.
    """
    count = cache(count)
    if not knob.monotone:
        return min(range(knob.minimum, knob.maximum + 1), key=lambda value: (abs(count(value) - budget), value))
    low, high = knob.minimum, knob.minimum
    while count(high) < budget and high < knob.maximum:
        low, high = high, min(2 * high, knob.maximum)
    # Now count(low) < budget <= count(high), unless the budget lies below the minimum or beyond the maximum.
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < budget else (low, middle)
    return min((low, high), key=lambda value: (abs(count(value) - budget), value))
