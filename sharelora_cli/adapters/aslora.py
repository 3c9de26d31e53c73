"""ASLoRA (arXiv 2412.10135): one A per module type for all layers, B merged adaptively while training.

The paper's abstract fixes two things: A is shared globally (here one A per module type, as in
ShareA) and B matrices are merged during training, ending below 25% of LoRA's parameters. The
stored copy of the paper says nothing more, so the rest is our choice, set by the recipe
(adapter.aslora.*) and documented in docs/aslora.md:

- schedule: a merge event every merge_every optimizer steps from merge_start·max_steps to
  merge_end·max_steps, each rounded half up (2.5 -> 3, as 3.5 -> 4; Python's round() would give
  2 and 4) and clamped to steps 1..max_steps-1, so the B's of the last merge still train for at
  least one step before the adapter is saved. A module type's L−K merges are spread evenly over
  the events, so it reaches its target K at the last one.
- choice: the most similar pair of the type's current B tensors (cosine of the flattened
  tensors, or the smallest L2 distance), any two layers, not only neighbours; ties go to the
  lowest indices. Similarities are computed in float64 so every process picks the same pair.
- merged B: the layer-weighted mean of the two, the single B closest (least squares) to what
  each of the merged layers had. The lower-index Parameter is kept and overwritten, the other
  dropped, so under DDP no parameter is ever created after wrapping.
- optimizer: the dropped Parameter leaves the optimizer with its state; the kept one's state is
  cleared and re-initialised at its next step, because its gradient is now the sum over all its
  layers, which neither member's moments describe.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sharelora_cli.adapters.base import Method
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.adapters.plan import Adapter, Group
from sharelora_cli.adapters.sharded_values import full_value
from sharelora_cli.config.recipe import ASLoRAConfig
from sharelora_cli.core.errors import UserError

MERGED_FACTOR = "lora_B"


def merge_steps(cfg: ASLoRAConfig, max_steps: int) -> list[int]:
    """The optimizer steps (1-based) after which B's are merged: the window's ends rounded half up, within 1..max_steps-1."""
    if cfg.merge_end < cfg.merge_start:
        raise UserError(
            f"adapter.aslora: merge_end={cfg.merge_end} is before merge_start={cfg.merge_start}; set merge_end >= merge_start"
        )
    if max_steps < 2:
        raise UserError(
            f"adapter.method=aslora needs train.max_steps >= 2 (got {max_steps}): the B's merged after a step "
            "must train for at least one more step"
        )
    start, end = (
        min(max(1, nearest_step(fraction * max_steps)), max_steps - 1) for fraction in (cfg.merge_start, cfg.merge_end)
    )
    return list(range(start, end + 1, cfg.merge_every))


def nearest_step(position: float) -> int:
    """position rounded half up (2.5 -> 3, 3.5 -> 4), not half to even as round() does.

    Float noise is rounded away first: 0.35·10 is 3.4999999999999996 and must give 4.
    """
    return math.floor(round(position, 9) + 0.5)


def target_groups(cfg: ASLoRAConfig, layers: int, module_type: str) -> int:
    """K: how many B tensors a module type with `layers` layers keeps at the end."""
    if cfg.target_groups is None:
        # Round first: 0.1·30 is 3.0000000000000004 in floating point and must give 3, not 4.
        return math.ceil(round(cfg.target_ratio * layers, 9))
    if cfg.target_groups > layers:
        raise UserError(
            f"adapter.aslora.target_groups={cfg.target_groups} is more than the {layers} layers of "
            f"module type {module_type}; choose at most {layers}, or set target_ratio instead"
        )
    return cfg.target_groups


def target_plan(plan: dict, cfg: ASLoRAConfig) -> dict:
    """The plan's shape once every type has K B tensors (which layers share is only known after training)."""
    result = {}
    for name, entry in plan.items():
        layers = len(entry["modules"])
        k = target_groups(cfg, layers, name)
        result[name] = {**entry, "index": {**entry["index"], MERGED_FACTOR: [min(p, k - 1) for p in range(layers)]}}
    return result


def most_similar_pair(tensors: Sequence[torch.Tensor], measure: str) -> tuple[int, int, float]:
    """(i, j, similarity), i < j, of the two most similar tensors; ties go to the lowest (i, j)."""
    flat = torch.stack([full_value(t).detach().flatten() for t in tensors]).double()
    if measure == "cosine":
        unit = F.normalize(flat, dim=1)
        scores = unit @ unit.t()
    else:
        scores = -torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    rows, cols = torch.triu_indices(len(tensors), len(tensors), offset=1)
    upper = scores[rows, cols]
    best = int(torch.argmax(upper))  # the first maximum, in row-major (i, j) order
    return int(rows[best]), int(cols[best]), float(upper[best])


def forget_in_optimizer(optimizer: torch.optim.Optimizer, removed: nn.Parameter, reset: nn.Parameter) -> None:
    """Take `removed` out of the optimizer with its state; clear `reset`'s state (re-created at its next step).

    Filtering each param group in place keeps the optimizer's order equal to Adapter.parameters(),
    which checkpoints rely on.
    """
    for param_group in optimizer.param_groups:
        param_group["params"] = [p for p in param_group["params"] if p is not removed]
    for param in (removed, reset):
        optimizer.state.pop(param, None)


class BMerger:
    """Merges each module type's most similar B's on the recipe's schedule; called after optimizer steps."""

    def __init__(self, adapter: Adapter, max_steps: int):
        cfg = adapter.config.aslora
        self.adapter = adapter
        self.measure = cfg.similarity
        self.steps = merge_steps(cfg, max_steps)
        self.targets = {name: target_groups(cfg, len(g.modules), name) for name, g in adapter.groups.items()}

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Merge as the schedule asks after optimizer step `step`; True when some B's were merged."""
        if step not in self.steps:
            return False
        events_done = self.steps.index(step) + 1
        changed = False
        for name, group in self.adapter.groups.items():
            layers = len(group.modules)
            # The plan's own tensor count says what is left to do, so a resumed run needs no other state.
            wanted = layers - events_done * (layers - self.targets[name]) // len(self.steps)
            while len(group.tensors[MERGED_FACTOR]) > wanted:
                keep, drop, similarity = most_similar_pair(group.tensors[MERGED_FACTOR], self.measure)
                self.merge(group, keep, drop, step, similarity, optimizer)
                changed = True
        return changed

    def merge(
        self, group: Group, keep: int, drop: int, step: int, similarity: float, optimizer: torch.optim.Optimizer
    ) -> None:
        """Point drop's layers at keep's tensor, set to the layer-weighted mean of both (keep < drop)."""
        tensors, index = group.tensors[MERGED_FACTOR], group.index[MERGED_FACTOR]
        members = [[path for path, k in zip(group.modules, index) if k == t] for t in (keep, drop)]
        kept, dropped = tensors[keep], tensors[drop]
        with torch.no_grad():
            kept.mul_(len(members[0])).add_(dropped, alpha=len(members[1])).div_(len(members[0]) + len(members[1]))
        new_index = [keep if k == drop else k - (k > drop) for k in index]
        self.adapter.bind(group, MERGED_FACTOR, [t for k, t in enumerate(tensors) if k != drop], new_index)
        group.merges.append({"step": step, "merged": members, "similarity": similarity})
        forget_in_optimizer(optimizer, removed=dropped, reset=kept)


ASLORA = Method(
    "aslora",
    LoraLayer,
    frozenset({"lora_A"}),
    "A shared across layers, B merged into K groups per module type while training",
    make_trainer_hook=BMerger,
    drops_parameters=True,
)
