"""`sharelora merge`: fold an adapter's ΔW into its base and write a plain transformers checkpoint.

The merge streams: base tensors are read one at a time from the base's safetensors files,
ΔW (from the adapter's own layers, in float32) is added to exactly the weights the adapter
targets, and output shards are written as they fill. Peak memory is about one output shard
(--max-shard-size, default MAX_SHARD_BYTES) plus the largest tensor, the adapter and the runtime,
never two copies of the model (docs/merge.md).

A base the adapter was trained on in 4-bit is merged QLoRA-style and streams the same way: each
base tensor is quantised to NF4 and dequantised by the code 4-bit loading runs (the skeleton
from_pretrained would build, on CUDA when present, else with bitsandbytes' CPU kernels), so the
merged weight is W_4bit + ΔW, the model training saw, without the whole 4-bit model in memory.
"""

import ctypes
import json
import logging
import shutil
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils.hub import convert_file_size_to_int

from sharelora_cli.adapters.adapter_io import read_adapter_config
from sharelora_cli.adapters.base import AdaptedLayer, is_conv1d
from sharelora_cli.config.recipe import QuantizationConfig
from sharelora_cli.core.atomic import atomic_directory
from sharelora_cli.core.errors import UserError, first_line
from sharelora_cli.models.loading import DTYPES, build_on_meta, load_config, resolve_model_path
from sharelora_cli.models.quantization import as_loaded_4bit, quantize_on_load
from sharelora_cli.outputs.conversion import SavedAdapter, base_model_name, check_output_dir, load_on_meta

log = logging.getLogger(__name__)

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shards are held in memory until written, so their size bounds the merge's peak memory.
MAX_SHARD_BYTES = 1 << 30
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".gguf",
    ".ckpt",
)
# What a hub snapshot needs for a merge: configs, tokenizer files, safetensors weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class Entry:
    """One output tensor: where its base tensor is, and the adapted layer whose ΔW it receives."""

    out_key: str
    file: Path
    key: str
    layer: AdaptedLayer | None = None

    def merged(self, base: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        dtype = dtype if dtype is not None and base.is_floating_point() else base.dtype
        if self.layer is None:
            return base.to(dtype)
        delta = self.layer.delta_weight()
        if is_conv1d(self.layer.base_layer):  # stored (d_in, d_out)
            delta = delta.t()
        return (base.float() + delta).to(dtype)


@dataclass(frozen=True)
class MergeResult:
    out: Path
    modules: int
    tensors: int
    shards: int
    nbytes: int
    dequantized_4bit: bool

    def summary(self) -> str:
        base = "dequantised 4-bit base" if self.dequantized_4bit else "base"
        return (
            f"merged {self.modules} adapted modules into the {base}: {self.tensors} tensors, "
            f"{self.nbytes / 2**20:,.1f} MiB in {self.shards} shard(s) -> {self.out}"
        )


def merge_adapter(
    adapter_dir: Path,
    out: Path,
    base: str | None = None,
    dtype: str = "auto",
    full_precision_base: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    max_shard_size: int | str | None = None,
) -> MergeResult:
    """Write base + ΔW as a transformers checkpoint in out (atomically: all of it or nothing).

    dtype: auto keeps the base's dtypes (the compute dtype for a 4-bit base), else bf16/fp16/fp32.
    device: where a 4-bit base's tensors are quantised and dequantised; defaults to CUDA when present, else CPU.
    max_shard_size: bytes, or transformers' syntax ("100MB", "2GB", "1GiB"); default MAX_SHARD_BYTES.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    out_dtype = _parse_dtype(dtype)
    shard_bytes = parse_shard_size(max_shard_size)
    config = read_adapter_config(adapter_dir)
    base_dir = resolve_base_dir(base_model_name(config, base))
    check_output_dir(out, overwrite, adapter_dir, base_dir)
    files = weight_files(base_dir)
    model_config = load_config(str(base_dir), key="--base")
    if getattr(model_config, "quantization_config", None):
        raise UserError(f"--base {base_dir} holds pre-quantised weights: merge needs the full-precision base model")
    saved = load_on_meta(adapter_dir, config, model_config)
    _check_mergeable(saved)
    entries = plan_entries(files, saved)
    quant = _trained_quantization(saved, full_precision_base)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    read = _dequantizing_reader(model_config, quant, device) if quant else _read_tensor
    if quant and out_dtype is None:
        out_dtype = DTYPES[quant.compute_dtype]
    release_freed_tensors()
    with atomic_directory(out, replace=overwrite) as staging:
        shards, nbytes = write_shards(staging, entries, read, out_dtype, shard_bytes)
        _write_config(staging, model_config, out_dtype, untied=any(e.out_key != e.key for e in entries))
        copy_side_files(base_dir, staging)
    return MergeResult(out, len(saved.layers()), len(entries), shards, nbytes, quant is not None)


def _check_mergeable(saved: SavedAdapter) -> None:
    """A method whose update depends on its input (AdaptedLayer.update_form; Lily's router) has no ΔW to fold in."""
    if any(layer.update_form == "input_dependent" for layer in saved.layers().values()):
        raise UserError(
            f"method '{saved.adapter.config.method}' cannot be merged: its update is input-dependent (it depends on "
            "the batch it is applied to), so no single ΔW exists; "
            "use the adapter with its base, or `sharelora export --format peft`"
        )


def _parse_dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in OUT_DTYPES:
        raise UserError(f"--dtype must be one of auto, {', '.join(OUT_DTYPES)}; got '{name}'")
    return OUT_DTYPES[name]


def release_freed_tensors() -> None:
    """Have glibc give every block of 1 MiB or more its own mapping, so a freed tensor goes back to the system.

    By default glibc raises this threshold (up to 32 MiB) each time a mapped block is freed and then serves
    tensors from its heap, where the pending shard's tensors pin the freed temporaries between them: the
    4-bit merge of a 220M-parameter model then peaked 135-250 MiB higher, varying from run to run, and the
    excess grew with the model (docs/merge.md). Other C libraries: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # <malloc.h>; setting it also turns the dynamic adjustment off
    libc.mallopt(m_mmap_threshold, 1 << 20)


def parse_shard_size(size: int | str | None) -> int:
    """--max-shard-size in bytes: an integer or transformers' "100MB" / "2GB" / "1GiB"."""
    if size is None:
        return MAX_SHARD_BYTES
    try:
        nbytes = convert_file_size_to_int(int(size) if str(size).isdigit() else size)
    except ValueError:
        nbytes = 0
    if nbytes <= 0:
        raise UserError(f"--max-shard-size must be a positive size such as 100MB, 2GB or 1GiB; got '{size}'")
    return nbytes


def _trained_quantization(saved: SavedAdapter, full_precision_base: bool) -> QuantizationConfig | None:
    """The 4-bit config to reproduce, or None for a full-precision merge."""
    quant = saved.quantization()
    if quant is None:
        return None
    if full_precision_base:
        log.warning(
            "the adapter was trained on a 4-bit base; merging into the full-precision weights as asked "
            "(--full-precision-base): the result differs from the 4-bit base by its quantisation error"
        )
        return None
    return quant


def resolve_base_dir(name: str) -> Path:
    """A local directory with the base's weights; a hub id is fetched (or found in the cache when offline)."""
    path = Path(resolve_model_path(name, "--base"))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError) as err:
        raise UserError(
            f"--base: '{name}' is neither a local model directory nor a reachable hub model: {first_line(err)}"
        ) from None


def weight_files(base_dir: Path) -> list[Path]:
    index = base_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index} is corrupt ({type(err).__name__}: {err})") from None
        return [base_dir / name for name in dict.fromkeys(weight_map.values())]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(
        f"--base {base_dir} has no model.safetensors or {INDEX_FILE}: merge reads safetensors weights "
        "(recipes/models/* hold configs only; convert .bin checkpoints with save_pretrained)"
    )


def plan_entries(files: list[Path], saved: SavedAdapter) -> list[Entry]:
    """Every base tensor in checkpoint order, with the layer whose ΔW it gets; shapes checked before any write."""
    model = saved.adapter.model
    wanted = {f"{path}.weight": layer for path, layer in saved.layers().items()}
    entries, found = [], set()
    for file in files:
        for key, shape in _tensor_shapes(file).items():
            name = _model_name(key, cast(PreTrainedModel, model).base_model_prefix, wanted)
            layer = wanted.get(name)
            if layer is not None:
                _check_target(file, key, shape, layer)
                found.add(name)
            entries.append(Entry(key, file, key, layer))
    for name, layer in wanted.items():
        if name not in found:
            entries.append(_untied_entry(model, name, layer, entries))
    return entries


def _model_name(key: str, prefix: str, names: Container[str]) -> str:
    """Checkpoint keys may omit the base-model prefix (e.g. GPT-2's 'h.0.attn.c_attn.weight')."""
    prefixed = f"{prefix}.{key}"
    return prefixed if key not in names and prefixed in names else key


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{file} is missing, corrupt or truncated ({first_line(err)})") from None


def _check_target(file: Path, key: str, shape: tuple[int, ...], layer: AdaptedLayer) -> None:
    expected = (layer.d_in, layer.d_out) if is_conv1d(layer.base_layer) else (layer.d_out, layer.d_in)
    if shape != expected:
        raise UserError(
            f"{file.name}: {key} has shape {shape}, the adapter expects {expected}: "
            "the base is not the model the adapter was trained on"
        )


def _untied_entry(model: nn.Module, name: str, layer: AdaptedLayer, entries: list[Entry]) -> Entry:
    """A targeted weight the checkpoint stores only through a tie (lm_head = embeddings): merged into its own copy."""
    path = name.removesuffix(".weight")
    weight = layer.base_layer.weight
    aliases = {
        n for n, p in model.named_parameters(remove_duplicate=False) if p is weight and not n.startswith(f"{path}.")
    }
    for entry in entries:
        if entry.key in aliases or f"{model.base_model_prefix}.{entry.key}" in aliases:
            return Entry(name, entry.file, entry.key, layer)
    raise UserError(
        f"the base checkpoint has no tensor for the adapted weight '{name}': "
        "the base is not the model the adapter was trained on"
    )


def _read_tensor(entry: Entry) -> torch.Tensor:
    # The tensor is a view of the file's memory map. A handle per tensor keeps the pages it touches
    # resident only while the tensor lives (until its shard is written), not for the whole merge.
    with safe_open(str(entry.file), framework="pt") as handle:
        return handle.get_tensor(entry.key)


def _dequantizing_reader(
    model_config: PretrainedConfig, quant: QuantizationConfig, device: str
) -> Callable[[Entry], torch.Tensor]:
    """Base tensors as 4-bit training saw them, one at a time: Linear4bit weights through NF4, the rest cast."""
    model = cast(PreTrainedModel, build_on_meta(model_config))
    quantizer = quantize_on_load(model, quant)
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    names |= {name for name, _ in model.named_buffers(remove_duplicate=False)}

    def read(entry: Entry) -> torch.Tensor:
        name = _model_name(entry.key, model.base_model_prefix, names)
        if name not in names:
            raise UserError(f"base checkpoint tensor '{entry.key}' has no place in the model built from its config")
        return as_loaded_4bit(model, quantizer, name, _read_tensor(entry), quant, device)

    return read


def write_shards(
    directory: Path,
    entries: list[Entry],
    read: Callable[[Entry], torch.Tensor],
    dtype: torch.dtype | None,
    shard_bytes: int,
) -> tuple[int, int]:
    """Write the merged tensors as safetensors shards (+ index when more than one); returns (shards, bytes)."""
    shards = list(_fill_shards(directory, entries, read, dtype, shard_bytes))
    total = sum(nbytes for _, _, nbytes in shards)
    if len(shards) == 1:
        shards[0][0].rename(directory / "model.safetensors")
        return 1, total
    weight_map = {}
    for i, (path, keys, _) in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), total


def _fill_shards(
    directory: Path,
    entries: list[Entry],
    read: Callable[[Entry], torch.Tensor],
    dtype: torch.dtype | None,
    shard_bytes: int,
) -> Iterator[tuple[Path, list[str], int]]:
    """Merge tensors into a pending shard and save it when full; only one shard is ever held in memory."""
    pending: dict[str, torch.Tensor] = {}
    size = count = 0
    for entry in tqdm(entries, desc="merge", unit="tensor", disable=None):
        tensor = entry.merged(read(entry), dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > shard_bytes:
            yield _save_shard(directory / f".shard-{count:05d}", pending), list(pending), size
            pending, size, count = {}, 0, count + 1
        pending[entry.out_key] = tensor
        size += nbytes
    yield _save_shard(directory / f".shard-{count:05d}", pending), list(pending), size


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _write_config(directory: Path, config: PretrainedConfig, dtype: torch.dtype | None, untied: bool) -> None:
    if dtype is not None:
        config.dtype = dtype
    if untied:  # the output head got its own ΔW, so it no longer equals the input embeddings
        config.tie_word_embeddings = False
    config.save_pretrained(directory)


def copy_side_files(base_dir: Path, directory: Path) -> None:
    """Tokenizer, generation config, licence...: every top-level file of the base except weights and config."""
    for path in sorted(base_dir.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and path.name != "config.json"
            and not path.name.endswith(WEIGHT_SUFFIXES)
        ):
            shutil.copyfile(path, directory / path.name)
