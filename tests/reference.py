"""Reference numbers from /work/shared/docs/methods.md, computed without sharelora's adapter code.

The tests compare the package against these: ΔW of each method from its factors, trainable
parameter counts from layer shapes, and random non-zero factors so that no check can pass
because a factor is still zero-initialised.
"""

import torch

from sharelora_cli.config.recipe import AdapterConfig

# Which factors one module type shares across its layers, per methods.md and the VeRA, Tied-LoRA, VB-LoRA papers
# (VeRA's pair and VB-LoRA's bank are shared by the whole model, not per module type).
SHARED_FACTORS = {
    "lora": set(),
    "sharea": {"lora_A"},
    "shareb": {"lora_B"},
    "shareab": {"lora_A", "lora_B"},
    "miss": set(),
    "vera": set(),
    "tied-lora": {"tied_A", "tied_B"},
    "vblora": set(),
    "randlora": set(),
    "tinylora": set(),
}
METHODS = tuple(SHARED_FACTORS)
# Settings the tiny test models need: VB-LoRA's default vector length (256) divides none of their widths
# (64, 128, 192, 256, 320); 32 divides them all.
TINY_BANK = {"num_vectors": 16, "vector_length": 32}
METHOD_OPTIONS = {"vblora": {"vblora": TINY_BANK}}


def adapter_config(method: str, **fields) -> AdapterConfig:
    """An AdapterConfig for `method` on the tiny test models (with METHOD_OPTIONS), plus `fields`."""
    return AdapterConfig.model_validate({"method": method, **METHOD_OPTIONS.get(method, {}), **fields})


def lora_delta(A: torch.Tensor, B: torch.Tensor, alpha: float, rank: int, rslora: bool = False) -> torch.Tensor:
    """ΔW = (α/r) B A, or (α/√r) B A with rsLoRA; shape (d_out, d_in)."""
    scaling = alpha / (rank**0.5 if rslora else rank)
    return scaling * (B @ A)


def miss_delta(D: torch.Tensor, d_in: int) -> torch.Tensor:
    """ΔW[o, i] = D[i mod r, o]: the block row [Dᵀ Dᵀ …] cut to d_in columns."""
    rank = D.shape[0]
    return D.t()[:, torch.arange(d_in) % rank]


def vera_delta(A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor, d_in: int) -> torch.Tensor:
    """ΔW = Λ_b B Λ_d A with the model's pair cut to the layer: A's first d_in columns, B's first d_out rows."""
    return torch.diag(b) @ B[: b.shape[0]] @ torch.diag(d) @ A[:, :d_in]


def tied_lora_delta(A, B, u, v, alpha: float, rank: int) -> torch.Tensor:
    """ΔW = (α/r) Λ_v B Λ_u A."""
    return (alpha / rank) * (torch.diag(v) @ B @ torch.diag(u) @ A)


def bank_mixture(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """One sub-vector: Σ over the top-k logits of softmax(those logits)_k · bank[their index]."""
    top = sorted(range(logits.shape[0]), key=lambda i: -float(logits[i].detach()))[:topk]
    weights = torch.softmax(logits[top], dim=0)
    return sum(w * bank[i] for w, i in zip(weights, top))


def vblora_delta(logits_A: torch.Tensor, logits_B: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """ΔW = B A, A's rows and B's columns each made of vector_length-long mixtures of the bank, in order."""
    rank, tiles_in, _ = logits_A.shape
    tiles_out, length = logits_B.shape[0], bank.shape[1]
    A = torch.zeros(rank, tiles_in * length, dtype=bank.dtype)
    B = torch.zeros(tiles_out * length, rank, dtype=bank.dtype)
    for i in range(rank):
        for t in range(tiles_in):
            A[i, t * length : (t + 1) * length] = bank_mixture(logits_A[i, t], bank, topk)
        for t in range(tiles_out):
            B[t * length : (t + 1) * length, i] = bank_mixture(logits_B[t, i], bank, topk)
    return B @ A


def randlora_delta(A, B, lam, gamma, d_in: int, d_out: int, scaling: float) -> torch.Tensor:
    """ΔW entry by entry from PEFT's layout: term m pairs λ's and A's (rank m // n, basis m % n), γ's basis m % n,
    with B's basis m // r, rank m % r; the scaled side is the layer's smaller one."""
    rank, bases = lam.shape
    small, large = min(d_in, d_out), max(d_in, d_out)
    terms = torch.arange(rank * bases)
    scaled = lam[terms // bases, terms % bases, None] * A[terms // bases, 0, :small] * gamma[terms % bases]
    wide = B[:large, terms // rank, terms % rank]  # (large, r·n)
    delta = scaling * (scaled.t() @ wide.t())  # (small, large)
    return delta.t() if d_in <= d_out else delta


def tinylora_delta(adapter, path: str) -> torch.Tensor:
    """ΔW = B (Σᵢ vᵢ Pᵢ) A, v the row of the module's tie group: the model's adapted modules in model order, cut into
    max(1, round(N·(1 − weight_tying))) runs of N // runs (PEFT's rule), the remainder joining the last run."""
    settings = adapter.config.tinylora
    order = {name: i for i, (name, _) in enumerate(adapter.model.named_modules())}
    paths = sorted((p for g in adapter.groups.values() for p in g.modules), key=order.__getitem__)
    runs = max(1, round(len(paths) * (1 - settings.weight_tying)))
    run = min(paths.index(path) // max(1, len(paths) // runs), runs - 1)
    layer = adapter.model.get_submodule(path)
    v = adapter.shared["tinylora_v"][run]
    mixture = sum(v[i] * layer.tinylora_P[i] for i in range(v.shape[0]))
    return layer.tinylora_B @ mixture @ layer.tinylora_A


def expected_delta(adapter, group, position: int) -> torch.Tensor:
    """ΔW of the position-th module of a group, using the factors the method's formula says that layer uses."""
    config = adapter.config

    def factor(name: str) -> torch.Tensor:
        return group.tensors[name][0 if name in SHARED_FACTORS[config.method] else position]

    if config.method == "miss":
        return miss_delta(factor("miss_D"), group.d_in)
    if config.method == "vera":
        shared = adapter.shared
        return vera_delta(
            shared["vera_A"], shared["vera_B"], factor("vera_lambda_d"), factor("vera_lambda_b"), group.d_in
        )
    if config.method == "tied-lora":
        return tied_lora_delta(*(factor(f"tied_{n}") for n in "ABuv"), config.alpha, config.rank)
    if config.method == "vblora":
        bank = adapter.shared["vblora_vector_bank"]
        return vblora_delta(factor("vblora_logits_A"), factor("vblora_logits_B"), bank, config.vblora.topk)
    if config.method == "tinylora":
        return tinylora_delta(adapter, group.modules[position])
    if config.method == "randlora":
        A, B = adapter.shared["randlora_A"], adapter.shared["randlora_B"]
        scaling = config.alpha / config.rank
        lam, gamma = factor("randlora_lambda"), factor("randlora_gamma")
        return randlora_delta(A, B, lam, gamma, group.d_in, group.d_out, scaling)
    return lora_delta(factor("lora_A"), factor("lora_B"), config.alpha, config.rank, config.rslora)


def trainable_count(method: str, rank: int, module_types: list[tuple[int, int, int]], bank=(256, 256)) -> int:
    """Trainable parameters for module types given as (d_in, d_out, number of layers).

    bank: VB-LoRA's (num_vectors, vector_length); Tied-LoRA with all of A, B, u, v trained; RandLoRA with
    n = ⌈min(d_in, d_out)/r⌉ bases per module, λ (r × n) and γ (n × min(d_in, d_out)); TinyLoRA untied, u = 64.
    """
    num_vectors, length = bank
    total = num_vectors * length if method == "vblora" else 0
    for d_in, d_out, layers in module_types:
        total += {
            "lora": layers * rank * (d_in + d_out),
            "sharea": rank * d_in + layers * rank * d_out,
            "shareb": layers * rank * d_in + rank * d_out,
            "shareab": rank * (d_in + d_out),
            "miss": layers * rank * d_out,
            "vera": layers * (rank + d_out),
            "tied-lora": rank * (d_in + d_out) + layers * (rank + d_out),
            "vblora": layers * num_vectors * rank * (d_in + d_out) // length,
            "randlora": layers * -(-min(d_in, d_out) // rank) * (rank + min(d_in, d_out)),
            "tinylora": layers * 64,  # one v of u = 64 per module: PEFT's defaults, no weight tying
        }[method]
    return total


def llama_module_types(
    hidden: int, ffn: int, layers: int, kv_dim: int, targets: list[str]
) -> list[tuple[int, int, int]]:
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
