"""Reference numbers from /work/shared/docs/methods.md, computed without sharelora's adapter code.

The tests compare the package against these: ΔW of each method from its factors, trainable
parameter counts from layer shapes, and random non-zero factors so that no check can pass
because a factor is still zero-initialised.
"""

import torch

# Which factors one module type shares across its layers, per methods.md.
SHARED_FACTORS = {
    "lora": set(),
    "sharea": {"lora_A"},
    "shareb": {"lora_B"},
    "shareab": {"lora_A", "lora_B"},
    "miss": set(),
}
METHODS = tuple(SHARED_FACTORS)


def lora_delta(A: torch.Tensor, B: torch.Tensor, alpha: float, rank: int, rslora: bool = False) -> torch.Tensor:
    """ΔW = (α/r) B A, or (α/√r) B A with rsLoRA; shape (d_out, d_in)."""
    scaling = alpha / (rank**0.5 if rslora else rank)
    return scaling * (B @ A)


def miss_delta(D: torch.Tensor, d_in: int) -> torch.Tensor:
    """ΔW[o, i] = D[i mod r, o]: the block row [Dᵀ Dᵀ …] cut to d_in columns."""
    rank = D.shape[0]
    return D.t()[:, torch.arange(d_in) % rank]


def expected_delta(config, group, position: int) -> torch.Tensor:
    """ΔW of the position-th module of a group, using the factors methods.md says that layer uses."""
    if config.method == "miss":
        return miss_delta(group.tensors["miss_D"][position], group.d_in)
    shared = SHARED_FACTORS[config.method]
    A = group.tensors["lora_A"][0 if "lora_A" in shared else position]
    B = group.tensors["lora_B"][0 if "lora_B" in shared else position]
    return lora_delta(A, B, config.alpha, config.rank, config.rslora)


def trainable_count(method: str, rank: int, module_types: list[tuple[int, int, int]]) -> int:
    """Trainable parameters for module types given as (d_in, d_out, number of layers)."""
    total = 0
    for d_in, d_out, layers in module_types:
        total += {
            "lora": layers * rank * (d_in + d_out),
            "sharea": rank * d_in + layers * rank * d_out,
            "shareb": layers * rank * d_in + rank * d_out,
            "shareab": rank * (d_in + d_out),
            "miss": layers * rank * d_out,
        }[method]
    return total


def llama_module_types(hidden: int, ffn: int, layers: int, kv_dim: int, targets: list[str]) -> list[tuple[int, int, int]]:
    """(d_in, d_out, L) of the named LLaMA projections."""
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, ffn),
        "up_proj": (hidden, ffn),
        "down_proj": (ffn, hidden),
    }
    return [(*shapes[target], layers) for target in targets]


def randomize_factors(adapter, seed: int = 0, scale: float = 0.05) -> None:
    """Fill every distinct factor with Gaussian noise (B and D are zero at init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
