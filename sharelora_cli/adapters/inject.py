"""Find target modules, wrap them in adapted layers, and record the sharing plan (adapters/plan.py)."""

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, SharedTensor, is_adaptable, layer_shape
from sharelora_cli.adapters.fusion import Fusion
from sharelora_cli.adapters.plan import Adapter, Group, regenerated_record
from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.core.errors import UserError


def inject_adapter(model: nn.Module, config: AdapterConfig, plan: dict | None = None) -> Adapter:
    """Freeze the model and wrap its target modules; with a saved plan, rebuild exactly that sharing."""
    # Plan first: a target or plan that does not fit raises before the model is changed at all.
    groups = _groups_from_plan(model, plan) if plan is not None else _plan_groups(model, config)
    layer_cls = METHODS[config.method].layer_cls
    hyper = hyper_of(config)
    specs = layer_cls.shared_tensors(group_dims(group.plan() for group in groups.values()), hyper)
    for param in model.parameters():
        param.requires_grad_(False)
    shared = _create_shared(model, groups, layer_cls, specs, hyper)
    fusion = Fusion()
    order = model_order(model, [path for group in groups.values() for path in group.modules])
    for group in groups.values():
        _create_factors(model, group, layer_cls, hyper)
        for position, path in enumerate(group.modules):
            factors = {f: group.tensors[f][group.index[f][position]] for f in layer_cls.factor_names}
            layer = layer_cls(model.get_submodule(path), factors | shared, hyper)
            layer.fusion = fusion
            layer.place(order[path], len(order))
            _replace_module(model, path, layer)
    layer_cls.link_layers([m for m in model.modules() if isinstance(m, AdaptedLayer)], hyper)
    # Each forward of the whole model starts a pass of the fusion (adapters/fusion.py).
    model.register_forward_pre_hook(fusion.start_forward)
    return Adapter(model, config, groups, shared, regeneration_rules(specs))


def regeneration_rules(specs: dict[str, SharedTensor]) -> dict[str, str]:
    """Name -> rule of the shared tensors that are regenerated rather than trained and saved."""
    return {name: spec.regenerated_by for name, spec in specs.items() if spec.regenerated_by is not None}


def hyper_of(config: AdapterConfig) -> Hyper:
    """What every layer of the adapter is built with, its method's own settings included."""
    section = METHODS[config.method].settings
    return Hyper(
        config.rank, config.alpha, config.dropout, config.rslora, getattr(config, section) if section else None
    )


def group_dims(entries) -> list[tuple[int, int]]:
    """(d_in, d_out) of every adapted module of a plan, group by group."""
    return [(entry["d_in"], entry["d_out"]) for entry in entries for _ in entry["modules"]]


def model_order(model: nn.Module, paths: list[str]) -> dict[str, int]:
    """Path -> its position among `paths` in the model's module order (PEFT's order of target modules)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return {path: i for i, path in enumerate(sorted(paths, key=order.__getitem__))}


@dataclass(frozen=True)
class PlannedTensor:
    """A distinct tensor a sharing plan implies: its shape, whether it trains, whether the adapter file holds it."""

    shape: tuple[int, ...]
    trainable: bool
    saved: bool


def planned_tensors(config: AdapterConfig, plan: dict) -> dict[str, PlannedTensor]:
    """Name -> every distinct tensor an adapter with this config and plan has."""
    layer_cls = METHODS[config.method].layer_cls
    hyper = hyper_of(config)
    # A shared tensor is either trained and saved, or frozen and regenerated.
    tensors = {
        name: PlannedTensor(tuple(spec.shape), trainable=spec.regenerated_by is None, saved=spec.regenerated_by is None)
        for name, spec in layer_cls.shared_tensors(group_dims(plan.values()), hyper).items()
    }
    frozen = layer_cls.frozen_factors(hyper)
    for name, entry in plan.items():
        for factor, shape in layer_cls.factor_shapes(entry["d_in"], entry["d_out"], hyper).items():
            for k in range(max(entry["index"][factor]) + 1):
                tensors[f"{name}.{factor}.{k}"] = PlannedTensor(tuple(shape), factor not in frozen, saved=True)
    return tensors


def tensor_shapes(config: AdapterConfig, plan: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a sharing plan implies in the adapter file (the saved file's exact contents)."""
    return {name: tensor.shape for name, tensor in planned_tensors(config, plan).items() if tensor.saved}


def planned_plan(model: nn.Module, config: AdapterConfig) -> dict:
    """The sharing plan inject_adapter would start from, without creating any tensor."""
    return {name: group.plan() for name, group in _plan_groups(model, config).items()}


def plan_trainable(config: AdapterConfig, plan: dict) -> int:
    """Trainable parameters of a sharing plan."""
    return sum(math.prod(t.shape) for t in planned_tensors(config, plan).values() if t.trainable)


def planned_trainable(model: nn.Module, config: AdapterConfig) -> int:
    """Trainable parameters inject_adapter would create, without creating them."""
    return plan_trainable(config, planned_plan(model, config))


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Dotted names of the modules the recipe asks to adapt, in model order."""
    names = [name for name, _ in model.named_modules() if name]
    if config.target_regex:
        try:
            pattern = re.compile(config.target_regex)
        except re.error as err:
            raise UserError(f"adapter.target_regex is not a valid regex: {err}") from None
        found = [name for name in names if pattern.fullmatch(name)]
        if not found:
            raise UserError(f"adapter.target_regex '{config.target_regex}' matches no module of the model")
        return _check_adaptable(model, found)
    found = []
    for target in config.targets:
        matches = [name for name in names if name == target or name.endswith("." + target)]
        if not matches:
            raise UserError(
                f"adapter.targets: '{target}' matches no module; module types here: {', '.join(module_types(model))}"
            )
        found.extend(matches)
    order = {name: i for i, name in enumerate(names)}
    return _check_adaptable(model, sorted(set(found), key=order.__getitem__))


def module_types(model: nn.Module) -> list[str]:
    """Last name components of the model's adaptable layers: what `targets` can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if name and is_adaptable(mod)})


def _check_adaptable(model: nn.Module, paths: list[str]) -> list[str]:
    for path in paths:
        module = model.get_submodule(path)
        if not is_adaptable(module):
            raise UserError(
                f"adapter.targets: '{path}' is a {type(module).__name__}; only linear layers "
                "(nn.Linear, Conv1D, Linear4bit) can be adapted"
            )
    return paths


def _plan_groups(model: nn.Module, config: AdapterConfig) -> dict[str, Group]:
    """One group per (module type, shape); shared factors get one tensor, the others one per module."""
    by_type: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for path in find_targets(model, config):
        d_in, d_out = layer_shape(model.get_submodule(path))
        by_type[(path.rsplit(".", 1)[-1], d_in, d_out)].append(path)
    shapes_per_type: dict[str, int] = defaultdict(int)
    for module_type, _, _ in by_type:
        shapes_per_type[module_type] += 1
    method = METHODS[config.method]
    hyper = hyper_of(config)
    groups = {}
    for (module_type, d_in, d_out), paths in by_type.items():
        name = module_type if shapes_per_type[module_type] == 1 else f"{module_type}.{d_out}x{d_in}"
        index = {
            f: method.layer_cls.layer_index(f, len(paths), hyper)
            or ([0] * len(paths) if f in method.shared else list(range(len(paths))))
            for f in method.layer_cls.factor_names
        }
        groups[name] = Group(name, paths, d_in, d_out, index)
    return groups


def _groups_from_plan(model: nn.Module, plan: dict) -> dict[str, Group]:
    groups = {}
    for name, entry in plan.items():
        for path in entry["modules"]:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise UserError(f"adapter does not fit this model: it has no module '{path}'") from None
            shape = layer_shape(module) if is_adaptable(module) else None
            if shape != (entry["d_in"], entry["d_out"]):
                raise UserError(
                    f"adapter does not fit this model: '{path}' has shape (d_in, d_out)={shape}, "
                    f"the adapter expects ({entry['d_in']}, {entry['d_out']})"
                )
        groups[name] = Group(
            name,
            list(entry["modules"]),
            entry["d_in"],
            entry["d_out"],
            dict(entry["index"]),
            merges=list(entry.get("merges", [])),
        )
    return groups


def _create_factors(model: nn.Module, group: Group, layer_cls: type[AdaptedLayer], hyper: Hyper) -> None:
    # Factors live on the base weight's device, in float32 even under a 4-bit or bf16 base
    # (QLoRA keeps adapters in full precision; autocast lowers the matmuls).
    device = cast(torch.Tensor, model.get_submodule(group.modules[0]).weight).device
    frozen = layer_cls.frozen_factors(hyper)
    for factor, shape in layer_cls.factor_shapes(group.d_in, group.d_out, hyper).items():
        tensors = []
        for _ in range(max(group.index[factor]) + 1):
            tensor = torch.empty(shape, device=device, dtype=torch.float32)
            layer_cls.init_factor(factor, tensor, hyper)
            tensors.append(nn.Parameter(tensor, requires_grad=factor not in frozen))
        group.tensors[factor] = tensors


def _create_shared(
    model: nn.Module,
    groups: dict[str, Group],
    layer_cls: type[AdaptedLayer],
    specs: dict[str, SharedTensor],
    hyper: Hyper,
) -> dict[str, nn.Parameter]:
    """The method's shared tensors, drawn on the CPU and moved to the base's device.

    On a weightless (meta) base they stay on the CPU: merge and export compute ΔW from them there.
    """
    tensors = _draw_shared(layer_cls, specs, hyper)
    first = next(iter(groups.values())).modules[0]
    device = cast(torch.Tensor, model.get_submodule(first).weight).device
    device = torch.device("cpu") if device.type == "meta" else device
    return {
        name: nn.Parameter(tensors[name].to(device), requires_grad=spec.regenerated_by is None)
        for name, spec in specs.items()
    }


def _draw_shared(
    layer_cls: type[AdaptedLayer], specs: dict[str, SharedTensor], hyper: Hyper
) -> dict[str, torch.Tensor]:
    # On the CPU whatever the device: VeRA's rule draws from a CPU generator, so every device gets the same numbers.
    tensors = {name: torch.empty(spec.shape, dtype=torch.float32) for name, spec in specs.items()}
    layer_cls.init_shared_tensors(tensors, hyper)
    return tensors


def planned_regenerated_record(config: AdapterConfig, plan: dict) -> dict[str, dict]:
    """The record (plan.regenerated_record) of the shared tensors an adapter with this plan regenerates, drawn afresh."""
    layer_cls, hyper = METHODS[config.method].layer_cls, hyper_of(config)
    specs = layer_cls.shared_tensors(group_dims(plan.values()), hyper)
    rules = regeneration_rules(specs)
    # Nothing is drawn for methods without such tensors: their shared tensors (VB-LoRA's bank) use the global RNG.
    return regenerated_record(_draw_shared(layer_cls, specs, hyper), rules) if rules else {}


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
