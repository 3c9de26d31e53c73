"""How a run is distributed (single process, DDP or FSDP2), and FSDP2's sharding of a model with adapters.

The recipe asks for sharding itself (train.distributed.strategy): Accelerate refuses `--cpu` with
`--use_fsdp`, and on a machine without GPUs a `--use_fsdp` launch used to fall back to DDP without a
word. A launch's FSDP request (`accelerate launch --use_fsdp`, or an Accelerate config with
`distributed_type: FSDP`) is read here, checked, and then hidden from Accelerate, so that the same
sharding code runs on CPUs (gloo) and GPUs (NCCL): `fully_shard` on each decoder layer, then on the
root, as Accelerate's FSDP2 plugin does with transformer-layer wrapping. The adapter's tensors are
first moved to the root (adapters/root_owned.py), so a factor shared by many layers is claimed by no
per-layer unit. Anything the launch asks for that this cannot do stops the run in one line.
"""

from collections.abc import MutableMapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sharelora_cli.adapters.plan import Adapter
from sharelora_cli.adapters.root_owned import follow_store, move_to_root
from sharelora_cli.adapters.sharded_values import full_value, placed_like
from sharelora_cli.config.recipe import DistributedConfig, QuantizationConfig, TrainConfig
from sharelora_cli.core.errors import UserError

Strategy = Literal["single", "ddp", "fsdp2"]


@dataclass(frozen=True)
class FsdpLaunch:
    """What an Accelerate launch asked of FSDP (its FSDP_* environment)."""

    reshard_after_forward: bool
    layer_classes: tuple[str, ...]  # fsdp_transformer_layer_cls_to_wrap; empty: the model's own decoder layers


@dataclass(frozen=True)
class Distribution:
    """How this run is distributed: recorded in summary.json and printed first."""

    strategy: Strategy
    processes: int
    reshard_after_forward: bool = True
    layer_classes: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"distributed: {self.strategy}, {self.processes} process{'es' if self.processes > 1 else ''}"


def take_launch_request(env: MutableMapping[str, str]) -> FsdpLaunch | None:
    """The launch's FSDP request, checked and removed from env so that Accelerator does not act on it itself.

    DeepSpeed is refused: under ZeRO-3 every shared factor would have to be registered as an external
    parameter of each layer using it, which sharelora does not do.
    """
    if flag(env, "ACCELERATE_USE_DEEPSPEED"):
        raise UserError(
            "DeepSpeed is not supported (ZeRO-3 cannot shard factors shared across layers here); "
            "shard with FSDP2 instead: accelerate launch --config_file recipes/accelerate/fsdp2.yaml, "
            "or set train.distributed.strategy=fsdp2"
        )
    if not flag(env, "ACCELERATE_USE_FSDP"):
        return None
    if env.get("FSDP_VERSION", "1") != "2":
        raise UserError(
            f"the launch asks for FSDP version {env.get('FSDP_VERSION', '1')}; sharelora shards with FSDP2: "
            "set fsdp_version: 2 in the Accelerate config (or pass --fsdp_version 2)"
        )
    if flag(env, "FSDP_OFFLOAD_PARAMS"):
        raise UserError("the launch asks for fsdp_offload_params, which sharelora does not do; set it to false")
    if flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise UserError(
            "the launch asks for fsdp_activation_checkpointing, which sharelora does not read; set it to false "
            "and train.gradient_checkpointing=true in the recipe"
        )
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise UserError(
            f"the launch asks for fsdp_auto_wrap_policy {policy}; sharelora shards each decoder layer: "
            "set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"
        )
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    del env["ACCELERATE_USE_FSDP"]
    return FsdpLaunch(reshard, classes)


def flag(env: MutableMapping[str, str], name: str) -> bool:
    return env.get(name, "false").lower() == "true"


def resolve(cfg: DistributedConfig, launch: FsdpLaunch | None, processes: int) -> Distribution:
    """The strategy the recipe and the launch agree on; a disagreement stops the run in one line."""
    if launch is not None and cfg.strategy == "ddp":
        raise UserError(
            "the launch asks for FSDP (accelerate --use_fsdp) but train.distributed.strategy=ddp; "
            "set train.distributed.strategy=fsdp2 (or auto), or launch without FSDP"
        )
    if cfg.strategy == "fsdp2" or launch is not None:
        if not dist.is_initialized():
            raise UserError(
                "train.distributed.strategy=fsdp2 needs a distributed launch: "
                "accelerate launch --num_processes N -m sharelora_cli train RECIPE"
            )
        reshard = launch.reshard_after_forward if launch else cfg.reshard_after_forward
        return Distribution("fsdp2", processes, reshard, launch.layer_classes if launch else ())
    return Distribution("ddp" if processes > 1 else "single", processes)


def check_fsdp2_settings(cfg: TrainConfig, plan: Distribution) -> None:
    """Settings that FSDP2 here cannot run, refused before anything is loaded."""
    if plan.strategy != "fsdp2":
        return
    if cfg.eval_tasks:
        raise UserError(
            "train.eval_tasks generates on the main process alone, and under FSDP2 each process holds only part "
            "of the model; leave train.eval_tasks empty and run `sharelora eval` on the saved adapter"
        )
    if cfg.compile:
        raise UserError("train.compile is not supported with FSDP2; set train.compile=false")
    if cfg.optimizer != "adamw":
        raise UserError(f"train.optimizer={cfg.optimizer} is not supported with FSDP2; use train.optimizer=adamw")


def check_fsdp2_quantization(quant: QuantizationConfig, precision: str, plan: Distribution) -> None:
    """A 4-bit base under FSDP2 keeps its packed bytes in the compute dtype (models/quantization.bnb_config):
    FSDP2's bf16 mixed precision would cast them as numbers, so it needs that dtype to be bf16 already."""
    if plan.strategy == "fsdp2" and quant.load_in_4bit and precision == "bf16" and quant.compute_dtype != "bfloat16":
        raise UserError(
            f"quantization.compute_dtype={quant.compute_dtype} with train.mixed_precision=bf16 under FSDP2 would "
            "cast the packed 4-bit weights; set quantization.compute_dtype=bfloat16"
        )


def decoder_layers(model: nn.Module, classes: tuple[str, ...]) -> list[nn.Module]:
    """The modules wrapped one FSDP unit each: the named classes, or the model's _no_split_modules."""
    wanted = set(classes or getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in wanted]
    if not layers:
        raise UserError(
            f"FSDP2 found no decoder layer to shard (looked for {', '.join(sorted(wanted)) or 'nothing'}); "
            "set fsdp_transformer_layer_cls_to_wrap to the model's decoder layer class"
        )
    return layers


def shard(model: nn.Module, adapter: Adapter, plan: Distribution, device: torch.device, precision: str) -> None:
    """fully_shard each decoder layer, then the root, with the adapter's tensors owned by the root."""
    if precision == "fp16":
        raise UserError("train.mixed_precision=fp16 is not supported with FSDP2; use bf16")
    store = move_to_root(model, adapter)
    before = dict(store.named_parameters())
    mesh = init_device_mesh(device.type, (plan.processes,))
    # bf16: FSDP2 casts the gathered parameters for compute and reduces gradients in float32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
    policy = mp or MixedPrecisionPolicy()
    for layer in decoder_layers(model, plan.layer_classes):
        fully_shard(layer, mesh=mesh, reshard_after_forward=plan.reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    follow_store(adapter, store, before)


def gradient_sync(model: nn.Module, accelerator: Accelerator, sync: bool) -> AbstractContextManager:
    """Around one micro-batch's backward: reduce gradients across processes only when sync (the last one)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else accelerator.no_sync(model)


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm as a number (FSDP2's is a DTensor over the shards)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def gathered(adapter: Adapter) -> Adapter:
    """The adapter with whole tensors, as adapter files hold them; every process must call it (it gathers)."""
    if not any(isinstance(t, DTensor) for t in adapter.named_tensors().values()):
        return adapter
    with torch.no_grad():
        tensors = [t for group in adapter.groups.values() for ts in group.tensors.values() for t in ts]
        whole = {
            id(t): nn.Parameter(full_value(t), requires_grad=t.requires_grad)
            for t in [*tensors, *adapter.shared.values()]
        }
    groups = {
        name: type(group)(
            group.name,
            group.modules,
            group.d_in,
            group.d_out,
            group.index,
            {factor: [whole[id(t)] for t in tensors] for factor, tensors in group.tensors.items()},
            group.merges,
        )
        for name, group in adapter.groups.items()
    }
    shared = {name: whole[id(t)] for name, t in adapter.shared.items()}
    return Adapter(adapter.model, adapter.config, groups, shared, adapter.regenerated)


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with whole tensors (the checkpoint format of one process); every process calls it."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full_value(v) for k, v in entry.items()} for i, entry in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading whole optimizer state: each parameter-shaped tensor split like its parameter."""
    for param, entry in optimizer.state.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                entry[key] = placed_like(value, param)
