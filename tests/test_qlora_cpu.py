"""A 4-bit NF4 base on CPU: adapters wrap Linear4bit, train and merge the same on every CPU.

bitsandbytes picks its CPU 4-bit path by CPU feature: with AVX512-BF16 it repacks a weight for a
bf16 kernel at the first eval-mode forward (no gradient flows through that kernel), otherwise it
dequantises at every forward. The `bnb_cpu_path` fixture forces each path in this process, and
tests/bnb_dispatch.py forces it at bitsandbytes' import in a child process, so both are tested on
any machine. Tolerances are those of the compute dtype's rounding (error_bound).
"""

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bnb_dispatch import force_detection_prelude
from safetensors.torch import load_file
from test_train import read_metrics, write_recipe

from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, ModelConfig, QuantizationConfig, load_recipe
from sharelora_cli.core.paths import PROJECT_ROOT
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.quantization import dequantized_weight
from sharelora_cli.training.loop import train

NF4 = {dtype: QuantizationConfig(load_in_4bit=True, compute_dtype=dtype) for dtype in ("float32", "bfloat16")}
TARGETS = ["q_proj", "down_proj"]


def error_bound(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |x Wᵀ computed in dtype (inputs rounded, float32 accumulation) − x Wᵀ exact|.

    Rounding x, W and the product to dtype costs at most 3u relative each term (u = unit roundoff),
    accumulating d_in products in float32 at most d_in·u32: so (3u + d_in·u32) · |x| |W|ᵀ.
    """
    unit = torch.finfo(dtype).eps / 2
    unit32 = torch.finfo(torch.float32).eps / 2
    return (3 * unit + x.shape[-1] * unit32) * (x.abs() @ weight.abs().t())


def raw_linear4bit(quant_type: str = "nf4") -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type=quant_type)
    layer.load_state_dict(torch.nn.Linear(64, 32, bias=False).state_dict())
    return layer.to("cpu")


def test_the_forced_path_reaches_bitsandbytes_and_its_repacking_is_real(bnb_cpu_path):
    """Without sharelora's guard, an eval pass repacks the weight exactly when AVX512-BF16 is detected."""
    layer = raw_linear4bit()
    assert bool(layer.support_avx512bf16_for_cpu) == bnb_cpu_path
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == bnb_cpu_path


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["lora", "shareab", "miss"])
def test_adapted_linear4bit_after_an_eval_pass_is_dequantized_base_plus_delta(
    tiny_model_dir, bnb_cpu_path, method, compute_dtype
):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), NF4[compute_dtype], torch.device("cpu"))
    adapter = inject_adapter(model, AdapterConfig(method=method, rank=4, targets=TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for factor in adapter.parameters():
            factor.normal_(0, 0.1)
    dense_before = {id(layer): dequantized_weight(layer.base_layer).float() for layer in adapter.layers()}
    model.eval()
    with torch.no_grad():  # what a validation pass does
        model(torch.randint(0, model.config.vocab_size, (2, 9)))
    model.train()
    dtype = getattr(torch, compute_dtype)
    for layer in adapter.layers():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        dense = dequantized_weight(layer.base_layer).float()
        torch.testing.assert_close(dense, dense_before[id(layer)], atol=0, rtol=0)
        delta = layer.delta_weight().detach()
        x = torch.randn(3, 5, layer.d_in, requires_grad=True)
        out = layer(x)
        bound = error_bound(x.detach(), dense, dtype) + error_bound(x.detach(), delta, torch.float32)
        assert ((out.detach() - x.detach() @ (dense + delta).t()).abs() <= bound).all()
        dy = torch.randn_like(out)
        out.backward(dy)
        # The gradient reaches the input through the frozen 4-bit product too, not only through the adapter.
        grad_bound = error_bound(dy, dense.t(), dtype) + error_bound(dy, delta.t(), torch.float32)
        assert ((x.grad - dy @ (dense + delta)).abs() <= grad_bound).all()


def test_validation_does_not_change_4bit_training_and_the_loss_falls(tmp_path, tiny_model_dir, bnb_cpu_path):
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        quantization=NF4["float32"].model_dump(),
        train={"max_steps": 8, "checkpoint_every": 100},
    )
    runs = {}
    for every in (2, 1000):
        recipe = load_recipe(str(path), [f"train.eval_every={every}", f"output_dir={tmp_path / str(every)}"])
        summary = train(recipe)
        runs[every] = read_metrics(Path(recipe.output_dir))
    assert [m["loss"] for m in runs[2]] == [m["loss"] for m in runs[1000]]
    val = [m["val_loss"] for m in runs[2] if "val_loss" in m]
    assert len(val) == 4 and val[-1] < val[0]
    tensors = load_file(tmp_path / "2" / "adapter" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(name.split(".")[1] == "lora_B" and t.abs().max() > 0 for name, t in tensors.items())
    saved = json.loads((tmp_path / "2" / "adapter" / "sharelora_config.json").read_text())
    assert saved["quantization"]["load_in_4bit"] and summary.trainable_parameters == sum(
        t.numel() for t in tensors.values()
    )


def run_child(code: str, avx512bf16: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", force_detection_prelude(avx512bf16) + code],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=600,
    )


AT_IMPORT = "import torch\n{importer}\nprint(torch._C._dispatch_has_kernel_for_dispatch_key('bitsandbytes::gemv_4bit', 'CPU'))\n"


@pytest.mark.parametrize("avx512bf16", [True, False])
def test_bitsandbytes_is_imported_without_log_lines_on_either_path(avx512bf16):
    plain = run_child(AT_IMPORT.format(importer="import bitsandbytes"), avx512bf16)
    quiet = run_child(
        AT_IMPORT.format(importer="from sharelora_cli.models.quantization import bitsandbytes\nbitsandbytes()"),
        avx512bf16,
    )
    # The prelude really selected the path: the fused bf16 kernel is registered only on AVX512-BF16's.
    assert plain.stdout.strip() == quiet.stdout.strip() == str(avx512bf16)
    assert bool(plain.stderr.strip()) == avx512bf16, plain.stderr  # the `kernels` notice bitsandbytes logs there
    assert quiet.returncode == 0 and quiet.stderr == ""


TRAIN_TWICE = """
import json, sys
from sharelora_cli.config.recipe import load_recipe
from sharelora_cli.training.loop import train
losses = {}
for every in (2, 1000):
    recipe = load_recipe(sys.argv[1], [f"train.eval_every={every}", f"output_dir={sys.argv[2]}/{every}"])
    train(recipe)
    losses[every] = [json.loads(line)["loss"] for line in open(f"{sys.argv[2]}/{every}/metrics.jsonl")]
print(json.dumps(losses))
"""


def test_4bit_training_under_bitsandbytes_own_avx512bf16_dispatch_ignores_validation(tmp_path, tiny_model_dir):
    """The real import-time dispatch (fused bf16 kernel registered), not only the per-layer flag."""
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        quantization=NF4["bfloat16"].model_dump(),
        train={"max_steps": 4, "checkpoint_every": 100},
    )
    child = subprocess.run(
        [sys.executable, "-c", force_detection_prelude(True) + TRAIN_TWICE, str(path), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr
    losses = json.loads(child.stdout.strip().splitlines()[-1])
    assert losses["2"] == losses["1000"] and len(losses["2"]) == 4
