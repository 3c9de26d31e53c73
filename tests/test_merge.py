"""`sharelora merge`: base + adapter == the merged checkpoint loaded fresh with transformers, for every method."""

import json
import sys
from pathlib import Path

import pytest
import torch
from reference import adapter_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from sharelora_cli.adapters.adapter_io import load_adapter, save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.adapters.lora import LoraLayer
from sharelora_cli.cli import main
from sharelora_cli.config.recipe import AdapterConfig, ModelConfig, QuantizationConfig
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.quantization import dequantized_weight, linear4bit_modules
from sharelora_cli.outputs import merge

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
METHODS = ["lora", "sharea", "shareb", "shareab", "miss", "vera", "tied-lora", "vblora", "randlora", "tinylora"]
# MiSS at rank 6 does not divide d_in (128, 320, 64, 256): the zero-padding path is exercised too.
RANKS = {"miss": 6}
# VeRA's and Tied-LoRA's ΔW multiplies four factors: at the 0.05 noise the others get, it would move the logits
# by less than the checks below can see, so their trained tensors get more.
FACTOR_STD = {"vera": 0.3, "tied-lora": 0.3}


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2: Conv1D projections and a tied output head."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def token_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def make_adapter(base_dir: Path, out: Path, config: AdapterConfig, extra: dict | None = None, plan: dict | None = None):
    """Save an adapter with random non-zero factors; returns (adapter dir, ids, base logits, adapted logits)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = token_ids(model.config.vocab_size)
    before = logits(model, ids)
    adapter = inject_adapter(model, config, plan=plan)
    torch.manual_seed(1)
    with torch.no_grad():
        for factor in adapter.parameters():
            factor.normal_(0, FACTOR_STD.get(config.method, 0.05))
    save_adapter(adapter, out, base_model=str(base_dir), extra=extra)
    return out, ids, before, logits(model, ids)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run `sharelora ARGS` in-process; returns (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["sharelora", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out + captured.err


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in errors[0], errors[0]


def checkpoint_keys(directory: Path) -> set[str]:
    keys = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def load_merged(directory: Path):
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@pytest.mark.parametrize("method", METHODS)
def test_merged_llama_equals_base_plus_adapter(method, tiny_model_dir, tmp_path, monkeypatch, capsys):
    config = adapter_config(method, rank=RANKS.get(method, 4), targets=LLAMA_TARGETS)
    adapter_dir, ids, before, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", config)
    code, output = run_cli(
        monkeypatch, capsys, "merge", "--adapter", adapter_dir, "--out", tmp_path / "merged", "--dtype", "fp32"
    )
    assert code == 0, output
    merged = logits(load_merged(tmp_path / "merged"), ids)
    assert (adapted - before).abs().max() > 0.1  # the adapter really changes the model
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert checkpoint_keys(tmp_path / "merged") == checkpoint_keys(tiny_model_dir)


@pytest.mark.parametrize("method", METHODS)
def test_merged_gpt2_conv1d_equals_base_plus_adapter(method, gpt2_dir, tmp_path, monkeypatch, capsys):
    config = adapter_config(method, rank=RANKS.get(method, 4), targets=GPT2_TARGETS)
    adapter_dir, ids, before, adapted = make_adapter(gpt2_dir, tmp_path / "adapter", config)
    code, output = run_cli(monkeypatch, capsys, "merge", "--adapter", adapter_dir, "--out", tmp_path / "merged")
    assert code == 0, output
    model = load_merged(tmp_path / "merged")
    assert (adapted - before).abs().max() > 0.01
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    # The output head stays tied to the input embeddings, stored once, as in the base.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert checkpoint_keys(tmp_path / "merged") == checkpoint_keys(gpt2_dir)


def test_adapting_a_tied_output_head_unties_it(gpt2_dir, tmp_path):
    config = AdapterConfig(method="lora", rank=4, target_regex=r".*\.c_attn|lm_head")
    adapter_dir, ids, _, adapted = make_adapter(gpt2_dir, tmp_path / "adapter", config)
    merge.merge_adapter(adapter_dir, tmp_path / "merged")
    model = load_merged(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)  # input embeddings untouched
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)


def test_merged_directory_is_a_plain_copy_of_the_base_layout(tiny_model_dir, tmp_path):
    """Same files, same config, tokenizer included: nothing in it needs sharelora to load."""
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(rank=4))
    merge.merge_adapter(adapter_dir, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == json.loads(
        (tiny_model_dir / "config.json").read_text()
    )
    text = "Natalia sold clips to 48 of her friends in April."
    ours, theirs = AutoTokenizer.from_pretrained(tmp_path / "merged"), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.chat_template == theirs.chat_template
    assert (tmp_path / "merged" / "generation_config.json").read_text() == (
        tiny_model_dir / "generation_config.json"
    ).read_text()


def test_merge_dtype_casts_every_float_tensor(tiny_model_dir, tmp_path):
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(method="shareb", rank=4))
    merge.merge_adapter(adapter_dir, tmp_path / "fp32", dtype="fp32")
    merge.merge_adapter(adapter_dir, tmp_path / "bf16", dtype="bf16")
    with (
        safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as full,
        safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as half,
    ):
        for key in full.keys():
            assert half.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(half.get_tensor(key), full.get_tensor(key).to(torch.bfloat16)), key
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_writes_sharded_checkpoint_with_index(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "MAX_SHARD_BYTES", 1 << 20)
    adapter_dir, ids, _, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(rank=4))
    result = merge.merge_adapter(adapter_dir, tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / merge.INDEX_FILE).read_text())
    assert (
        result.shards
        == len(set(index["weight_map"].values()))
        == len(list((tmp_path / "merged").glob("*.safetensors")))
    )
    assert result.shards > 2
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids), adapted, atol=1e-5, rtol=0)
    # A sharded base is read through its index.
    again = merge.merge_adapter(adapter_dir, tmp_path / "again", base=str(tmp_path / "merged"))
    assert again.tensors == result.tensors


def test_failed_merge_leaves_no_output_directory(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "MAX_SHARD_BYTES", 1 << 20)
    adapter_dir, *_ = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(rank=4))
    written = []

    def disk_full_on_second_shard(tensors, path, metadata):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        merge_save(tensors, path, metadata=metadata)

    merge_save = merge.save_file
    monkeypatch.setattr(merge, "save_file", disk_full_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        merge.merge_adapter(adapter_dir, tmp_path / "out" / "merged")
    assert written and not Path(written[0]).exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir, ids, _, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(rank=4))
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    args = ["merge", "--adapter", adapter_dir, "--out", tmp_path / "merged"]
    assert_one_line_error(*run_cli(monkeypatch, capsys, *args), "already exists", "--overwrite")
    assert (tmp_path / "merged" / "keep.txt").exists()
    code, output = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0, output
    assert not (tmp_path / "merged" / "keep.txt").exists()
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids), adapted, atol=1e-5, rtol=0)
    assert_one_line_error(
        *run_cli(monkeypatch, capsys, "merge", "--adapter", adapter_dir, "--out", adapter_dir, "--overwrite"),
        "is one of the inputs",
    )


@pytest.fixture
def llama_adapter(tiny_model_dir, tmp_path) -> Path:
    return make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(method="sharea", rank=4))[0]


def save_random_llama(directory: Path, base_dir: Path, **changes) -> Path:
    config = AutoModelForCausalLM.from_pretrained(base_dir).config
    for key, value in changes.items():
        setattr(config, key, value)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_adapter_on_another_architecture_is_refused(llama_adapter, gpt2_dir, tmp_path, monkeypatch, capsys):
    result = run_cli(
        monkeypatch, capsys, "merge", "--adapter", llama_adapter, "--base", gpt2_dir, "--out", tmp_path / "m"
    )
    assert_one_line_error(*result, "does not fit", "model.layers.0.self_attn.q_proj")
    assert not (tmp_path / "m").exists()


def test_adapter_on_other_shapes_is_refused(llama_adapter, tiny_model_dir, tmp_path, monkeypatch, capsys):
    wider = save_random_llama(tmp_path / "wider", tiny_model_dir, hidden_size=192, head_dim=48)
    result = run_cli(monkeypatch, capsys, "merge", "--adapter", llama_adapter, "--base", wider, "--out", tmp_path / "m")
    assert_one_line_error(*result, "does not fit", "shape")
    # A config that matches the adapter over weights that do not: caught from the safetensors header.
    (wider / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    result = run_cli(monkeypatch, capsys, "merge", "--adapter", llama_adapter, "--base", wider, "--out", tmp_path / "m")
    assert_one_line_error(*result, "q_proj.weight has shape (192, 192)")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "config"])
def test_missing_or_corrupt_adapter_is_refused(damage, llama_adapter, tmp_path, monkeypatch, capsys):
    weights, config = llama_adapter / "adapter.safetensors", llama_adapter / "sharelora_config.json"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        config.write_text(config.read_text()[:50])
    result = run_cli(monkeypatch, capsys, "merge", "--adapter", llama_adapter, "--out", tmp_path / "m")
    assert_one_line_error(*result, "not found" if damage == "missing" else "corrupt")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dtype", "fp8"], "--dtype must be one of"),
        (["--base", "llama-3.2-1b"], "has no model.safetensors"),
    ],
)
def test_bad_options_are_refused(args, needle, llama_adapter, tmp_path, monkeypatch, capsys):
    result = run_cli(monkeypatch, capsys, "merge", "--adapter", llama_adapter, "--out", tmp_path / "m", *args)
    assert_one_line_error(*result, needle)


FP32_4BIT = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")


def save_qlora_adapter(tiny_model_dir: Path, out: Path, method: str, targets: list[str] = LLAMA_TARGETS):
    """An adapter on the 4-bit base (fp32 compute); returns (dir, ids, logits).

    The logits come from an eval-mode pass, the one that would repack the weights for bf16 on AVX512-BF16 CPUs.
    """
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), FP32_4BIT, torch.device("cpu"))
    ids = token_ids(model.config.vocab_size)
    adapter = inject_adapter(model, adapter_config(method, rank=4, targets=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for factor in adapter.parameters():
            factor.normal_(0, FACTOR_STD.get(method, 0.05))
    save_adapter(adapter, out, base_model=str(tiny_model_dir), extra={"quantization": FP32_4BIT.model_dump()})
    return out, ids, logits(model, ids)


@pytest.fixture
def qlora_adapter(tiny_model_dir, tmp_path, bnb_cpu_path):
    """A ShareAB adapter on the 4-bit base, on either bitsandbytes CPU path."""
    return save_qlora_adapter(tiny_model_dir, tmp_path / "adapter", "shareab")


def test_cli_merges_a_4bit_adapter_into_the_dequantized_base_or_the_full_precision_one(
    qlora_adapter, tiny_model_dir, tmp_path, monkeypatch, capsys, caplog
):
    # bitsandbytes' CPU kernels here; the same check on CUDA needs a GPU session (docs/merge.md).
    adapter_dir, ids, qlora_logits = qlora_adapter
    args = ["merge", "--adapter", adapter_dir, "--out", tmp_path / "merged"]
    code, output = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "dequantised 4-bit base" in output, output
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids), qlora_logits, atol=1e-5, rtol=0)
    code, output = run_cli(monkeypatch, capsys, *args[:-1], tmp_path / "full", "--full-precision-base")
    assert code == 0, output
    assert "quantisation error" in caplog.text
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_adapter(full, adapter_dir)
    full_logits = logits(load_merged(tmp_path / "full"), ids)
    torch.testing.assert_close(full_logits, logits(full, ids), atol=1e-5, rtol=0)
    # The two merges differ by the quantisation error, so the default really reproduced the 4-bit base.
    assert (full_logits - qlora_logits).abs().max() > 1e-3


@pytest.mark.parametrize("bnb_cpu_path", ["no-avx512-bf16"], indirect=True)
@pytest.mark.parametrize("method", ["vera", "tied-lora", "vblora"])
def test_cli_merges_vera_tied_lora_and_vblora_trained_on_a_4bit_base(
    method, tiny_model_dir, tmp_path, monkeypatch, capsys, bnb_cpu_path
):
    """The merge regenerates VeRA's frozen pair and reads the saved bank and tied factors, into the dequantised base."""
    adapter_dir, ids, qlora_logits = save_qlora_adapter(tiny_model_dir, tmp_path / "adapter", method)
    code, output = run_cli(monkeypatch, capsys, "merge", "--adapter", adapter_dir, "--out", tmp_path / "merged")
    assert code == 0 and "dequantised 4-bit base" in output, output
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (qlora_logits - logits(base, ids)).abs().max() > 0.1
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids), qlora_logits, atol=1e-5, rtol=0)


def shard_tensor_bytes(directory: Path) -> list[tuple[int, int]]:
    """(tensors, bytes of tensor data) of every safetensors shard in directory."""
    sizes = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors = [handle.get_tensor(key) for key in handle.keys()]
        sizes.append((len(tensors), sum(t.numel() * t.element_size() for t in tensors)))
    return sizes


def test_max_shard_size_bounds_every_output_shard(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter_dir, ids, _, adapted = make_adapter(tiny_model_dir, tmp_path / "adapter", AdapterConfig(rank=4))
    args = ["merge", "--adapter", adapter_dir, "--out", tmp_path / "merged"]
    code, output = run_cli(monkeypatch, capsys, *args, "--max-shard-size", "300KB")
    assert code == 0, output
    sizes = shard_tensor_bytes(tmp_path / "merged")
    assert len(sizes) > 5
    # A shard passes 300 kB only when one tensor alone is larger (the 1 MiB embedding), as in transformers.
    assert all(nbytes <= 300_000 or count == 1 for count, nbytes in sizes), sizes
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids), adapted, atol=1e-5, rtol=0)
    for bad in ("lots", "1.5GB", "0"):
        result = run_cli(monkeypatch, capsys, *args[:-1], tmp_path / "bad", "--max-shard-size", bad)
        assert_one_line_error(*result, "--max-shard-size must be a positive size", bad)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_streamed_4bit_merge_reproduces_the_4bit_load_tensor_by_tensor(
    compute_dtype, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """With ΔW = 0 the merge writes the base as a 4-bit load leaves it: bit for bit, read from a sharded base."""
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="400KB")
    assert (sharded / merge.INDEX_FILE).is_file()
    quant = QuantizationConfig(load_in_4bit=True, compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(sharded)
    adapter = inject_adapter(model, AdapterConfig(rank=4, targets=LLAMA_TARGETS))  # B = 0: ΔW = 0
    save_adapter(adapter, tmp_path / "adapter", base_model=str(sharded), extra={"quantization": quant.model_dump()})
    code, output = run_cli(
        monkeypatch,
        capsys,
        "merge",
        "--adapter",
        tmp_path / "adapter",
        "--out",
        tmp_path / "m",
        "--max-shard-size",
        "1MB",
    )
    assert code == 0 and "dequantised 4-bit base" in output, output
    loaded = load_model(ModelConfig(name_or_path=str(sharded)), quant, torch.device("cpu"))
    dtype = getattr(torch, compute_dtype)
    quantized = {
        f"{name}.weight": module for name, module in loaded.named_modules() if module in linear4bit_modules(loaded)
    }
    merged = {}
    for file in (tmp_path / "m").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            merged |= {key: handle.get_tensor(key) for key in handle.keys()}
    assert len(quantized) == 7 * 4 and quantized.keys() <= merged.keys()
    for key, tensor in merged.items():
        expected = dequantized_weight(quantized[key]) if key in quantized else checkpoint_tensor(sharded, key).to(dtype)
        assert tensor.dtype == dtype and torch.equal(tensor, expected), key


def checkpoint_tensor(directory: Path, key: str) -> torch.Tensor:
    weight_map = json.loads((directory / merge.INDEX_FILE).read_text())["weight_map"]
    with safe_open(str(directory / weight_map[key]), framework="pt") as handle:
        return handle.get_tensor(key)


@pytest.mark.parametrize("bnb_cpu_path", ["no-avx512-bf16"], indirect=True)
def test_4bit_merge_from_a_sharded_base_in_small_shards_equals_the_4bit_adapter(
    tiny_model_dir, tmp_path, monkeypatch, capsys, bnb_cpu_path
):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="400KB")
    adapter_dir, ids, qlora_logits = save_qlora_adapter(sharded, tmp_path / "adapter", "shareab")
    args = ["merge", "--adapter", adapter_dir, "--out", tmp_path / "merged", "--max-shard-size", "500KB"]
    code, output = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "dequantised 4-bit base" in output, output
    assert len(shard_tensor_bytes(tmp_path / "merged")) > 3
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids), qlora_logits, atol=1e-5, rtol=0)


def test_input_dependent_update_is_not_merged(llama_adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(LoraLayer, "update_form", "input_dependent")
    result = run_cli(monkeypatch, capsys, "merge", "--adapter", llama_adapter, "--out", tmp_path / "m")
    assert_one_line_error(*result, "input-dependent", "cannot be merged")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("bnb_cpu_path", ["no-avx512-bf16"], indirect=True)
def test_4bit_merge_of_gpt2_conv1d_keeps_the_checkpoint_layout(gpt2_dir, tmp_path, monkeypatch, capsys, bnb_cpu_path):
    """4-bit loading transposes a Conv1D weight to quantise it; the merge writes it back in GPT-2's (d_in, d_out)."""
    adapter_dir, ids, qlora_logits = save_qlora_adapter(gpt2_dir, tmp_path / "adapter", "lora", GPT2_TARGETS)
    code, output = run_cli(monkeypatch, capsys, "merge", "--adapter", adapter_dir, "--out", tmp_path / "merged")
    assert code == 0 and "dequantised 4-bit base" in output, output
    assert (qlora_logits - logits(AutoModelForCausalLM.from_pretrained(gpt2_dir), ids)).abs().max() > 0.01
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), ids), qlora_logits, atol=1e-5, rtol=0)
