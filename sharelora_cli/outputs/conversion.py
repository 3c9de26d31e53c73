"""What merge and export share: a saved adapter on a weightless model of its base, and the --out rule.

Merge and export need each layer's factors and ΔW, and the layer types and shapes of the
base, but never the base weights themselves: the base is built on the meta device (no
storage), the adapter is injected with its saved plan (which checks every module's shape),
and the layers are then bound to the saved tensors, so `delta_weight()` is the method's own.
Shared tensors a method regenerates (VeRA's A, B) are drawn again on the CPU, after
read_checked_tensors proved they come out as the adapter recorded them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from torch import nn
from transformers import PretrainedConfig

from sharelora_cli.adapters.adapter_io import read_checked_tensors
from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.adapters.plan import Adapter
from sharelora_cli.config.recipe import QuantizationConfig
from sharelora_cli.core.errors import UserError
from sharelora_cli.models.loading import build_on_meta


@dataclass
class SavedAdapter:
    config: dict
    adapter: Adapter

    def layers(self) -> dict[str, AdaptedLayer]:
        """Module path -> adapted layer, in plan order."""
        return {
            path: cast(AdaptedLayer, self.adapter.model.get_submodule(path))
            for g in self.adapter.groups.values()
            for path in g.modules
        }

    def quantization(self) -> QuantizationConfig | None:
        """The quantisation the adapter was trained under, when its config records one with load_in_4bit."""
        recorded = self.config.get("quantization")  # written by `sharelora train` beside the plan
        if not recorded:
            return None
        quant = QuantizationConfig.model_validate(recorded)
        return quant if quant.load_in_4bit else None


def base_model_name(config: dict, base: str | None) -> str:
    """--base when given, else the base_model the adapter was trained on."""
    name = base or config.get("base_model")
    if not name:
        raise UserError("the adapter config records no base_model: pass --base PATH_OR_ID")
    return name


def load_on_meta(adapter_dir: Path, config: dict, model_config: PretrainedConfig) -> SavedAdapter:
    """Inject the adapter (config from read_adapter_config) into a meta model; factors as float32 CPU tensors."""
    adapter_config, tensors = read_checked_tensors(adapter_dir, config)
    model = build_on_meta(model_config)
    try:
        adapter = inject_adapter(model, adapter_config, plan=config["plan"])
    except UserError as err:
        raise UserError(f"{err} (is --base the model the adapter was trained on?)") from None
    for group in adapter.groups.values():
        for factor, index in group.index.items():
            count = len(group.tensors[factor])
            loaded = [_frozen(tensors[f"{group.name}.{factor}.{k}"]) for k in range(count)]
            adapter.bind(group, factor, loaded, index)
    # Regenerated shared tensors were drawn on the CPU by inject_adapter; the saved ones come from the file.
    for name in adapter.shared.keys() - adapter.regenerated.keys():
        adapter.bind_shared(name, _frozen(tensors[name]))
    return SavedAdapter(config, adapter)


def _frozen(tensor) -> nn.Parameter:
    # ΔW is computed in float32 whatever the saved dtype: the merge adds it in higher precision.
    return nn.Parameter(tensor.float(), requires_grad=False)


def check_output_dir(out: Path, overwrite: bool, *inputs: Path) -> None:
    """--out must be new (or --overwrite given) and must not be one of the inputs it would replace."""
    if any(Path(out).resolve() == Path(p).resolve() for p in inputs):
        raise UserError(f"--out {out} is one of the inputs: write the result to a new directory")
    if Path(out).exists() and not overwrite:
        raise UserError(f"--out {out} already exists: choose a new directory or pass --overwrite to replace it")
