"""Find target modules, wrap them in adapted layers, and record the sharing plan (adapters/plan.py)."""

import math
import re
from collections import defaultdict

import torch
from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer, Hyper, is_adaptable, layer_shape
from sharelora_cli.adapters.fusion import Fusion
from sharelora_cli.adapters.plan import Adapter, Group
from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.errors import UserError
from sharelora_cli.recipe import AdapterConfig


def inject_adapter(model: nn.Module, config: AdapterConfig, plan: dict | None = None) -> Adapter:
    """Freeze the model and wrap its target modules; with a saved plan, rebuild exactly that sharing."""
    # Plan first: a target or plan that does not fit raises before the model is changed at all.
    groups = _groups_from_plan(model, plan) if plan is not None else _plan_groups(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    method = METHODS[config.method]
    hyper = Hyper(config.rank, config.alpha, config.dropout, config.rslora)
    fusion = Fusion()
    for group in groups.values():
        _create_factors(model, group, method.layer_cls, config.rank)
        for position, path in enumerate(group.modules):
            factors = {f: group.tensors[f][group.index[f][position]] for f in method.layer_cls.factor_names}
            layer = method.layer_cls(model.get_submodule(path), factors, hyper)
            layer.fusion = fusion
            _replace_module(model, path, layer)
    # Each forward of the whole model starts a pass of the fusion (adapters/fusion.py).
    model.register_forward_pre_hook(fusion.start_forward)
    return Adapter(model, config, groups)


def tensor_shapes(config: AdapterConfig, plan: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every distinct tensor a sharing plan implies (the saved file's exact contents)."""
    layer_cls = METHODS[config.method].layer_cls
    shapes = {}
    for name, entry in plan.items():
        for factor, shape in layer_cls.factor_shapes(entry["d_in"], entry["d_out"], config.rank).items():
            for k in range(max(entry["index"][factor]) + 1):
                shapes[f"{name}.{factor}.{k}"] = tuple(shape)
    return shapes


def planned_plan(model: nn.Module, config: AdapterConfig) -> dict:
    """The sharing plan inject_adapter would start from, without creating any tensor."""
    return {name: group.plan() for name, group in _plan_groups(model, config).items()}


def plan_trainable(config: AdapterConfig, plan: dict) -> int:
    """Trainable parameters of a sharing plan."""
    return sum(math.prod(shape) for shape in tensor_shapes(config, plan).values())


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
    shapes_per_type = defaultdict(int)
    for module_type, _, _ in by_type:
        shapes_per_type[module_type] += 1
    method = METHODS[config.method]
    groups = {}
    for (module_type, d_in, d_out), paths in by_type.items():
        name = module_type if shapes_per_type[module_type] == 1 else f"{module_type}.{d_out}x{d_in}"
        index = {
            f: [0] * len(paths) if f in method.shared else list(range(len(paths)))
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
        groups[name] = Group(name, list(entry["modules"]), entry["d_in"], entry["d_out"], dict(entry["index"]),
                             merges=list(entry.get("merges", [])))
    return groups


def _create_factors(model: nn.Module, group: Group, layer_cls: type[AdaptedLayer], rank: int) -> None:
    # Factors live on the base weight's device, in float32 even under a 4-bit or bf16 base
    # (QLoRA keeps adapters in full precision; autocast lowers the matmuls).
    device = model.get_submodule(group.modules[0]).weight.device
    for factor, shape in layer_cls.factor_shapes(group.d_in, group.d_out, rank).items():
        tensors = []
        for _ in range(max(group.index[factor]) + 1):
            tensor = torch.empty(shape, device=device, dtype=torch.float32)
            layer_cls.init_factor(factor, tensor)
            tensors.append(nn.Parameter(tensor))
        group.tensors[factor] = tensors


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
