"""Lily: A per stride of adjacent layers, B experts per module type, a router per layer; PEFT's numbers, no merge.

Parity with PEFT: both models evaluate the same formula, so they can differ only by the order of their
additions (another blocking of a matmul, autograd summing a shared factor's uses in another order). Each
such sum of n terms is off by at most γ_n·Σ|terms| (tests/numerics.py), and Σ|terms| is taken as the
compared tensor's largest entry. A logit's longest sums run over 320 features (down_proj's d_in), a
gradient's over 32 tokens × 320 features; an error passes through 4 blocks and the head, so the bound is
DEPTH = 5 times γ_n in the tensors' dtype: 5·γ_320 ≈ 9.5e-5 (float32) or 1.8e-13 (float64) of the
largest logit, 5·γ_10240 for gradients. The full-precision comparisons run in float64, the 4-bit base in
float32 (bitsandbytes' compute dtype). A wrong sharing, routing or padding rule moves the logits by more
than 1e-3 (asserted, so no comparison can pass vacuously).
"""

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from numerics import gamma
from peft import LilyConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_merge import assert_one_line_error
from test_merge import run_cli as run_cli_in_process
from test_train import read_metrics, train_and_resume, write_recipe
from tiny_architectures import LLAMA_TARGETS, load_tiny_llama
from transformers import AutoModelForCausalLM

from sharelora_cli.adapters.adapter_io import load_adapter
from sharelora_cli.adapters.inject import inject_adapter, planned_trainable
from sharelora_cli.config.recipe import AdapterConfig, ModelConfig, QuantizationConfig, validate
from sharelora_cli.core.errors import UserError
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.quantization import dequantized_weight
from sharelora_cli.outputs.export import export_adapter

DEPTH = 5  # blocks and head an error passes through
LOGIT_TERMS, GRADIENT_TERMS = 320, 32 * 320
TOKENS = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(4))


def lily_config(rank: int = 4, stride_A: int = 3, num_B: int = 3, scaling: float = 0.5, targets=LLAMA_TARGETS):
    settings = {"stride_A": stride_A, "num_B": num_B, "scaling": scaling}
    return AdapterConfig(method="lily", rank=rank, targets=targets, lily=settings)


def peft_lily(model, rank: int = 4, stride_A: int = 3, num_B: int = 3, scaling: float = 0.5):
    config = LilyConfig(r=rank, stride_A=stride_A, num_B=num_B, scaling=scaling, target_modules=LLAMA_TARGETS)
    return get_peft_model(model, config)


def randomize(adapter, seed: int = 0) -> None:
    """Non-zero experts (they start at zero) and routers far enough from uniform that the mixture matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.3)


def copy_into_peft(adapter, peft_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's layers given our tensors; returns (ours, PEFT's) per distinct tensor, to compare gradients."""
    pairs = {}
    with torch.no_grad():
        for group in adapter.groups.values():
            for path in group.modules:
                ours, theirs = adapter.model.get_submodule(path), peft_model.base_model.model.get_submodule(path)
                for name, value in (
                    ("lily_A", ours.lily_A),
                    ("lily_B", ours.lily_B.reshape(-1, ours.d_out)),
                    ("lily_router", ours.lily_router),
                ):
                    weight = getattr(theirs, name)["default"].weight
                    weight.copy_(value)
                    pairs[id(getattr(ours, name))] = (getattr(ours, name), weight)
    return list(pairs.values())


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, terms: int = LOGIT_TERMS) -> None:
    """|actual − expected| ≤ DEPTH·γ_terms·max|expected| in the tensors' dtype (module docstring)."""
    bound = DEPTH * gamma(terms, expected.dtype) * float(expected.detach().abs().max())
    torch.testing.assert_close(actual, expected, atol=bound, rtol=0)


def assert_same_as_peft(model, peft_model, pairs) -> None:
    """Same logits, then the same gradient for every (our tensor, PEFT's tensor) pair after the same loss."""
    ours, theirs = model(TOKENS, labels=TOKENS), peft_model(input_ids=TOKENS, labels=TOKENS)
    assert_close_relative(ours.logits, theirs.logits)
    ours.loss.backward()
    theirs.loss.backward()
    for mine, peft_tensor in pairs:
        assert mine.grad.abs().max() > 0
        assert_close_relative(mine.grad.reshape(peft_tensor.shape), peft_tensor.grad, GRADIENT_TERMS)


def test_a_is_shared_by_each_stride_of_adjacent_layers_and_the_experts_by_the_type(tiny_model):
    adapter = inject_adapter(tiny_model, lily_config(stride_A=3, num_B=3))
    for group in adapter.groups.values():  # 4 layers: stride 3 gives A's for layers (0, 1, 2) and (3)
        assert group.index == {"lily_A": [0, 0, 0, 1], "lily_B": [0, 0, 0, 0], "lily_router": [0, 1, 2, 3]}
        layers = [tiny_model.get_submodule(path) for path in group.modules]
        assert layers[0].lily_A is layers[2].lily_A is not layers[3].lily_A
        assert all(layer.lily_B is layers[0].lily_B for layer in layers)
        assert layers[0].lily_B.shape == (3, 4, group.d_out) and not layers[0].lily_B.any()
        assert len({id(layer.lily_router) for layer in layers}) == 4


def test_count_equals_peft_s_trainable_parameters(tiny_model, tiny_model_dir):
    """Tiny Llama (4 layers; q, o: 128→128; k, v: 128→64; gate, up: 128→320; down: 320→128), r 4, stride 3, 3 B's.

    Per type: 2 A's of r·d_in, 3 experts of r·d_out, 4 routers of 3·r: Σd_in = 6·128 + 320 = 1088,
    Σd_out = 2·128 + 2·64 + 2·320 + 128 = 1152, so 2·4·1088 + 3·4·1152 + 7·4·3·4 = 8704 + 13824 + 336 = 22,864.
    """
    config = lily_config()
    ours = inject_adapter(tiny_model, config).num_trainable()
    trainable, _ = peft_lily(load_tiny_llama(tiny_model_dir)).get_nb_trainable_parameters()
    assert ours == planned_trainable(load_tiny_llama(tiny_model_dir), config) == trainable == 22_864


def test_inspect_counts_lily_on_llama_7b():
    """LLaMA-7B (d 4096, ffn 11008, L 32), r 64, all seven projections, PEFT's defaults (stride_A 1, num_B 2).

    A per layer: r·Σd_in = 64·(6·4096 + 11008) = 64·35,584 per layer, 32 layers: 72,876,032.
    Two experts per type: 2·r·Σd_out = 128·(5·4096 + 2·11008) = 128·42,496 = 5,439,488.
    A router (2 × 64) per module: 7·32·128 = 28,672. Total 78,344,192 (LoRA's 159,907,840 less 51%).
    """
    result = run_cli("inspect", "--model", "llama-7b", "--rank", "64", "--targets", ",".join(LLAMA_TARGETS), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lily"] == 78_344_192


def test_outputs_and_every_gradient_equal_peft_s_in_float64(tiny_model, tiny_model_dir):
    base = load_tiny_llama(tiny_model_dir).double()
    adapter = inject_adapter(tiny_model, lily_config())
    tiny_model.double()  # factors too (they are created in float32)
    randomize(adapter)
    peft_model = peft_lily(load_tiny_llama(tiny_model_dir).double())
    pairs = copy_into_peft(adapter, peft_model)
    assert len(pairs) == 7 * (2 + 1 + 4)
    with torch.no_grad():
        assert (tiny_model(TOKENS).logits - base(TOKENS).logits).abs().max() > 1e-3
    assert_same_as_peft(tiny_model, peft_model, pairs)


def test_padding_enters_the_router_as_in_peft(tiny_model, tiny_model_dir):
    """One example alone, and beside a padded one: PEFT's (and so sharelora's) mixture averages over both."""
    adapter = inject_adapter(tiny_model, lily_config())
    tiny_model.double()
    randomize(adapter, seed=1)
    peft_model = peft_lily(load_tiny_llama(tiny_model_dir).double())
    copy_into_peft(adapter, peft_model)
    padded = torch.stack([TOKENS[0], torch.cat([TOKENS[1, :8], torch.zeros(8, dtype=torch.long)])])
    mask = torch.stack([torch.ones(16, dtype=torch.long), (torch.arange(16) < 8).long()])
    with torch.no_grad():
        alone = tiny_model(TOKENS[:1]).logits[0]
        batched = tiny_model(input_ids=padded, attention_mask=mask).logits
        assert (batched[0] - alone).abs().max() > 1e-3  # the other example, padding included, moved the mixture
        assert_close_relative(batched, peft_model(input_ids=padded, attention_mask=mask).logits)


def test_on_a_4bit_base_equals_peft_on_the_dequantised_weights(tiny_model_dir):
    quant = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), quant, torch.device("cpu"))
    adapter = inject_adapter(model, lily_config())
    randomize(adapter, seed=2)
    dense = load_tiny_llama(tiny_model_dir)
    with torch.no_grad():
        for layer in adapter.layers():
            dense.get_submodule(layer_path(model, layer)).weight.copy_(dequantized_weight(layer.base_layer))
    peft_model = peft_lily(dense)
    pairs = copy_into_peft(adapter, peft_model)
    model.train()  # bitsandbytes' CPU path dequantises in training mode (tests/test_qlora_cpu.py)
    assert_same_as_peft(model, peft_model, pairs)


def layer_path(model, layer) -> str:
    return next(name for name, module in model.named_modules() if module is layer)


def test_no_single_delta_so_merge_is_refused_in_one_line(tiny_model, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from sharelora_cli.adapters.adapter_io import save_adapter

    adapter = inject_adapter(tiny_model, lily_config())
    save_adapter(adapter, tmp_path / "adapter", base_model=str(tiny_model_dir))
    assert adapter.layers()[0].update_form == "input_dependent"
    result = run_cli_in_process(
        monkeypatch, capsys, "merge", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged"
    )
    assert_one_line_error(*result, "'lily' cannot be merged", "depends on the batch", "export --format peft")
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module", params=["full-precision", "4-bit"])
def runs(request, tmp_path_factory, tiny_model_dir) -> dict:
    """The quickstart's shape (all seven projections) with adapter.method=lily: 8 steps, and the same resumed at 5."""
    tmp = tmp_path_factory.mktemp(f"lily-{request.param}")
    sections = {"quantization": {"load_in_4bit": True, "compute_dtype": "float32"}} if request.param == "4-bit" else {}
    recipe = write_recipe(
        tmp,
        tiny_model_dir,
        adapter={"method": "lily", "rank": 8, "targets": LLAMA_TARGETS, "lily": {"stride_A": 2, "num_B": 2}},
        train={"max_steps": 8, "lr": 1e-2, "eval_every": 4, "checkpoint_every": 5},
        **sections,
    )
    return train_and_resume(recipe, tmp)


def test_training_lowers_the_validation_loss(runs):
    val = [m["val_loss"] for m in read_metrics(runs["full"]) if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]


def test_a_resumed_run_ends_with_the_uninterrupted_adapter(runs):
    full = load_file(runs["full"] / "adapter" / "adapter.safetensors")
    resumed = load_file(runs["resumed"] / "adapter" / "adapter.safetensors")
    assert full.keys() == resumed.keys() and sum(t.numel() for t in full.values()) == runs["trainable"]
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


# PEFT has no 4-bit Lily: the 4-bit adapter's parity is test_on_a_4bit_base_equals_peft_on_the_dequantised_weights.
@pytest.mark.parametrize("runs", ["full-precision"], indirect=True)
def test_the_trained_adapter_exports_to_peft_s_lily_with_the_same_logits(runs, tiny_model_dir, tmp_path):
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    adapted = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_adapter(adapted, runs["full"] / "adapter")
    export_adapter(runs["full"] / "adapter", Path(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["stride_A"], config["num_B"]) == ("LILY", 2, 2)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    with torch.no_grad():
        expected = adapted.eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        assert (expected - base).abs().max() > 1e-3
        got = peft_model.eval()(input_ids=ids).logits
    assert_close_relative(got, expected)


@pytest.mark.parametrize(
    ("key", "value", "message"), [("num_B", 1, "greater than or equal to 2"), ("stride_A", 0, "1")]
)
def test_settings_outside_peft_s_range_are_one_line_recipe_errors(key, value, message):
    with pytest.raises(UserError, match=rf"adapter\.lily\.{key}: .*{message}"):
        validate({"adapter": {"method": "lily", "lily": {key: value}}})
