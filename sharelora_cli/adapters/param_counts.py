"""Trainable-parameter counts per method for an architecture, from its config on the meta device."""

from dataclasses import dataclass

from sharelora_cli.adapters.aslora import target_plan
from sharelora_cli.adapters.inject import plan_trainable, planned_plan, planned_trainable
from sharelora_cli.config.recipe import METHOD_NAMES, AdapterConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.models.loading import build_on_meta, load_config

# Every method but ASLoRA, whose count changes while it trains (inspect reports it apart).
COMPARED_METHODS = tuple(name for name in METHOD_NAMES if name != "aslora")


@dataclass(frozen=True)
class MethodCount:
    method: str
    # None when the method cannot adapt this architecture as configured; `unfit` says why.
    trainable: int | None
    lora_trainable: int
    unfit: str = ""

    @property
    def reduction(self) -> float:
        """Fraction of LoRA's trainable parameters saved (0.441 = 44.1% fewer)."""
        assert self.trainable is not None, "a method that does not fit the model saves nothing"
        return 1 - self.trainable / self.lora_trainable


def count_methods(model_name: str, adapter: AdapterConfig, methods=COMPARED_METHODS) -> list[MethodCount]:
    """Count every method's trainable parameters for one architecture, rank and target set."""
    model = build_on_meta(load_config(model_name))
    lora = planned_trainable(model, adapter.model_copy(update={"method": "lora"}))
    return [method_count(model, adapter, m, lora) for m in methods] + aslora_counts(model, adapter, lora)


def method_count(model, adapter: AdapterConfig, method: str, lora_trainable: int) -> MethodCount:
    """One method's count; a method whose settings do not fit the model (VB-LoRA's vector_length) says why."""
    try:
        return MethodCount(
            method, planned_trainable(model, adapter.model_copy(update={"method": method})), lora_trainable
        )
    except UserError as err:
        return MethodCount(method, None, lora_trainable, unfit=str(err))


def aslora_counts(model, adapter: AdapterConfig, lora_trainable: int) -> list[MethodCount]:
    """ASLoRA's count shrinks while training: from ShareA's (one B per layer) to K B's per module type."""
    config = adapter.model_copy(update={"method": "aslora"})
    plan = planned_plan(model, config)
    return [
        MethodCount("aslora-start", plan_trainable(config, plan), lora_trainable),
        MethodCount("aslora-target", plan_trainable(config, target_plan(plan, config.aslora)), lora_trainable),
    ]


def format_table(rows: list[MethodCount]) -> str:
    lines = [f"{'method':<14}{'trainable':>16}{'vs LoRA':>10}"]
    for row in rows:
        if row.trainable is None:
            lines.append(f"{row.method:<14}{'—':>16}{'':>10}  {row.unfit}")
        else:
            lines.append(f"{row.method:<14}{row.trainable:>16}{-row.reduction:>+10.1%}")
    return "\n".join(lines)


def unfit_notes(rows: list[MethodCount]) -> list[str]:
    """One line per method left out of the counts, for stderr beside --json."""
    return [f"note: {row.method} not counted: {row.unfit}" for row in rows if row.trainable is None]
