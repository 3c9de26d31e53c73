"""Time one adapted linear layer, forward + backward, and the thin products inside it.

    .venv/bin/python scripts/bench_adapter_layer.py [--tokens 1024] [--rank 8] [--repeats 100]

For each (d_in, d_out) of the CPU preset's Llama (hidden 512, ffn 1536, GQA k/v 256) it prints the
median time of: the frozen base alone (input requiring grad), LoRA differentiated by autograd
(F.linear twice) and sharelora's LoRA layer (its fused path, adapters/fusion.py, for a module
alone). Then the thin products whose layout the design weighs: dy·B with B (d_out × r) as stored vs
through its contiguous transpose, and B's gradient as dyᵀh (in B's layout) vs (hᵀdy)ᵀ. Findings are
in docs/benchmarks.md ("Profile").
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sharelora_cli.adapters.base import Hyper
from sharelora_cli.adapters.lora import LoraLayer

SHAPES = [(512, 512), (512, 256), (512, 1536), (1536, 512)]
SCALING = 2.0


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """name -> median milliseconds; the functions take turns, so load bursts hit them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(repeats + 5):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if repeat >= 5:  # the first five rounds warm up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def layer_steps(x, dy, weight, lora_A, lora_B) -> dict[str, Callable[[], None]]:
    """name -> one forward + backward of the layer computed that way."""
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    base.weight.data = weight
    rank = lora_A.shape[0]
    layer = LoraLayer(base, {"lora_A": lora_A, "lora_B": lora_B}, Hyper(rank, SCALING * rank, 0.0, False))

    def floor():
        F.linear(x, weight).backward(dy)

    def autograd_lora():
        out = F.linear(x, weight).add_(F.linear(F.linear(x, lora_A) * SCALING, lora_B))
        out.backward(dy)

    def sharelora():
        layer(x).backward(dy)

    return {"floor": floor, "autograd LoRA": autograd_lora, "sharelora": sharelora}


def thin_products(x2, dy2, lora_B) -> dict[str, Callable[[], torch.Tensor]]:
    h = torch.randn(x2.shape[0], lora_B.shape[1])
    B = lora_B.detach()
    return {
        "dy·B (stored)": lambda: dy2 @ B,
        "dy·B (via Bᵀ contiguous)": lambda: dy2 @ B.t().contiguous().t(),
        "grad B as dyᵀh": lambda: dy2.t() @ h,
        "grad B as (hᵀdy)ᵀ": lambda: (h.t() @ dy2).t(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="batch × sequence length")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for d_in, d_out in SHAPES:
        weight = torch.randn(d_out, d_in) / d_in**0.5
        lora_A = nn.Parameter(torch.randn(args.rank, d_in))
        lora_B = nn.Parameter(torch.randn(d_out, args.rank))
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        dy = torch.randn(args.tokens, d_out)
        layer = median_ms(layer_steps(x, dy, weight, lora_A, lora_B), args.repeats)
        products = median_ms(thin_products(x.detach(), dy, lora_B), args.repeats)
        floor = layer.pop("floor")
        added = ", ".join(f"{name} +{ms - floor:.3f}" for name, ms in layer.items())
        print(f"{d_in}→{d_out}: floor {floor:.3f} ms; {added}")
        print("    " + ", ".join(f"{name} {ms:.3f}" for name, ms in products.items()))


if __name__ == "__main__":
    main()
