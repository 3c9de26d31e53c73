"""Trainable-parameter counts per method for an architecture, from its config on the meta device."""

from dataclasses import dataclass

from sharelora_cli.adapters.aslora import target_plan
from sharelora_cli.inject import plan_trainable, planned_plan, planned_trainable
from sharelora_cli.modeling import build_on_meta, load_config
from sharelora_cli.recipe import AdapterConfig

COMPARED_METHODS = ("lora", "sharea", "shareb", "shareab", "miss")


@dataclass(frozen=True)
class MethodCount:
    method: str
    trainable: int
    lora_trainable: int

    @property
    def reduction(self) -> float:
        """Fraction of LoRA's trainable parameters saved (0.441 = 44.1% fewer)."""
        return 1 - self.trainable / self.lora_trainable


def count_methods(model_name: str, adapter: AdapterConfig, methods=COMPARED_METHODS) -> list[MethodCount]:
    """Count every method's trainable parameters for one architecture, rank and target set."""
    model = build_on_meta(load_config(model_name))
    counts = {m: planned_trainable(model, adapter.model_copy(update={"method": m})) for m in {"lora", *methods}}
    return [MethodCount(m, counts[m], counts["lora"]) for m in methods] + aslora_counts(model, adapter, counts["lora"])


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
        lines.append(f"{row.method:<14}{row.trainable:>16}{-row.reduction:>+10.1%}")
    return "\n".join(lines)
