"""ASLoRA: B merges keep the model continuous, follow the schedule, survive resume, save/load, export and DDP."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within, reordering_bound
from reference import lora_delta, randomize_factors
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.adapters.adapter_io import load_adapter
from sharelora_cli.adapters.aslora import BMerger, merge_steps, target_groups
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, ASLoRAConfig, load_recipe
from sharelora_cli.core.errors import UserError
from sharelora_cli.outputs.export import export_adapter
from sharelora_cli.outputs.merge import merge_adapter
from sharelora_cli.training.loop import train

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 8, 16.0
# 8 steps, merge events after steps 2, 4, 6; four layers down to two B's: merges after steps 4 and 6.
SCHEDULE = {"merge_start": 0.25, "merge_end": 0.75, "merge_every": 2, "target_groups": 2}


def aslora(model, **schedule):
    """ASLoRA on the tiny model with random non-zero factors; returns (adapter, copy of the plain base)."""
    base = copy.deepcopy(model)
    config = AdapterConfig(method="aslora", rank=RANK, alpha=ALPHA, targets=TARGETS, aslora=ASLoRAConfig(**schedule))
    adapter = inject_adapter(model, config)
    randomize_factors(adapter)
    return adapter, base


def gsm8k_batch(model_dir: Path, data_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]]
    texts = [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)


def one_training_step(adapter, batch) -> torch.optim.Optimizer:
    """A real AdamW step on GSM8K text, so the optimizer holds state for every tensor."""
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    adapter.model(**batch, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def logits(model, vocab_size: int) -> torch.Tensor:
    tokens = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(tokens).logits


def fold_lora(base, plan: dict, a_tensors: dict, b_tensors: dict) -> None:
    """Reference merge by hand: each layer's weight += (α/r) B A with the B and A its plan position names."""
    with torch.no_grad():
        for name, entry in plan.items():
            for position, path in enumerate(entry["modules"]):
                A = a_tensors[name][entry["index"]["lora_A"][position]]
                B = b_tensors[name][entry["index"]["lora_B"][position]]
                base.get_submodule(path).weight.add_(lora_delta(A, B, ALPHA, RANK))


def b_values(adapter) -> dict[str, list[torch.Tensor]]:
    return {name: [b.detach().clone() for b in g.tensors["lora_B"]] for name, g in adapter.groups.items()}


def test_merging_identical_bs_leaves_the_logits_unchanged(tiny_model, tiny_model_dir, shared_data):
    adapter, _ = aslora(tiny_model, merge_start=0.5, merge_end=0.5, target_groups=3)
    optimizer = one_training_step(adapter, gsm8k_batch(tiny_model_dir, shared_data))
    with torch.no_grad():
        for group in adapter.groups.values():
            group.tensors["lora_B"][3].copy_(group.tensors["lora_B"][1])
    before = logits(tiny_model, tiny_model.config.vocab_size)
    merger = BMerger(adapter, max_steps=10)
    dropped = [g.tensors["lora_B"][3] for g in adapter.groups.values()]
    kept = [g.tensors["lora_B"][1] for g in adapter.groups.values()]

    assert not merger.after_step(4, optimizer)
    assert merger.after_step(5, optimizer)

    assert torch.equal(logits(tiny_model, tiny_model.config.vocab_size), before)
    for group in adapter.groups.values():
        assert group.index["lora_B"] == [0, 1, 2, 1]
        layers = [tiny_model.get_submodule(path) for path in group.modules]
        assert layers[1].lora_B is layers[3].lora_B is group.tensors["lora_B"][1]
        assert group.merges == [
            {"step": 5, "merged": [[group.modules[1]], [group.modules[3]]], "similarity": pytest.approx(1.0)}
        ]
    # The optimizer follows: same tensors in Adapter.parameters() order, no state for dropped or merged ones.
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in adapter.parameters()]
    assert all(p in optimizer.state for p in adapter.parameters() if not any(p is k for k in kept))
    assert not any(p in optimizer.state for p in [*dropped, *kept])


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_merging_different_bs_gives_the_model_using_their_mean(tiny_model, similarity):
    adapter, base = aslora(tiny_model, merge_start=0.5, merge_end=0.5, target_groups=3, similarity=similarity)
    with torch.no_grad():
        for group in adapter.groups.values():  # layers 0 and 2 close, not equal: the pair to merge
            group.tensors["lora_B"][2].copy_(group.tensors["lora_B"][0] * 1.1 + 0.002)
    before = b_values(adapter)
    a_tensors = {name: [a.detach().clone() for a in g.tensors["lora_A"]] for name, g in adapter.groups.items()}
    assert BMerger(adapter, max_steps=2).after_step(1, torch.optim.AdamW(adapter.parameters()))

    mean_b = {name: [(bs[0] + bs[2]) / 2, bs[1], bs[3]] for name, bs in before.items()}
    plan = {
        name: {**g.plan(), "index": {"lora_A": [0] * 4, "lora_B": [0, 1, 0, 2]}} for name, g in adapter.groups.items()
    }
    fold_lora(base, plan, a_tensors, mean_b)
    vocab_size = tiny_model.config.vocab_size
    torch.testing.assert_close(logits(tiny_model, vocab_size), logits(base, vocab_size), atol=1e-5, rtol=1e-5)
    for name, group in adapter.groups.items():
        assert group.index["lora_B"] == [0, 1, 0, 2]
        b0, b2 = before[name][0].flatten(), before[name][2].flatten()
        expected = F.cosine_similarity(b0, b2, dim=0) if similarity == "cosine" else -torch.dist(b0, b2)
        assert group.merges[0]["similarity"] == pytest.approx(float(expected), rel=1e-5)


def test_merging_to_one_b_gives_the_mean_over_all_layers_whatever_the_order(tiny_model):
    adapter, _ = aslora(tiny_model, merge_start=0.5, merge_end=0.5, target_groups=1)
    before = b_values(adapter)
    assert BMerger(adapter, max_steps=4).after_step(2, torch.optim.AdamW(adapter.parameters()))
    for name, group in adapter.groups.items():
        assert group.index["lora_B"] == [0, 0, 0, 0] and len(group.merges) == 3
        # Layer-weighted means compose: the final B is the plain mean of the four layers' B's.
        # Three merges of ≤ 4 roundings each (scale, add, divide) and a 4-term mean (3 adds, a divide): 16 steps,
        # each on a weighted sum of B's later divided by its weight, so each costs at most u·max|B| in the result.
        bound = reordering_bound(16, torch.stack(before[name]).abs().amax(0))
        assert_within(group.tensors["lora_B"][0], torch.stack(before[name]).mean(0), bound)


def test_schedule_spreads_the_merges_evenly_and_ends_at_the_target(tiny_model):
    adapter, _ = aslora(tiny_model, merge_start=0.1, merge_end=0.5, merge_every=10, target_groups=1)
    merger, optimizer = BMerger(adapter, max_steps=100), torch.optim.AdamW(adapter.parameters())
    counts = {}
    for step in range(1, 101):
        if merger.after_step(step, optimizer):
            counts[step] = [len(g.tensors["lora_B"]) for g in adapter.groups.values()]
    # Five events (10..50), three merges per type: after event e, floor(e·3/5) merges are done.
    assert counts == {20: [3, 3, 3], 40: [2, 2, 2], 50: [1, 1, 1]}
    assert len(optimizer.param_groups[0]["params"]) == 3 + 3


def test_schedule_and_target_options_are_checked():
    assert merge_steps(ASLoRAConfig(merge_start=0.1, merge_end=0.3, merge_every=2), 30) == [3, 5, 7, 9]
    assert target_groups(ASLoRAConfig(target_ratio=0.1), 30, "q_proj") == 3
    assert target_groups(ASLoRAConfig(target_ratio=0.25), 32, "q_proj") == 8
    with pytest.raises(UserError, match="merge_end >= merge_start"):
        merge_steps(ASLoRAConfig(merge_start=0.6, merge_end=0.2), 100)
    with pytest.raises(UserError, match="target_groups=5 is more than the 4 layers of module type q_proj"):
        target_groups(ASLoRAConfig(target_groups=5), 4, "q_proj")


@pytest.mark.parametrize(
    "fraction, max_steps, step",
    [
        (0.25, 10, 3),
        (0.35, 10, 4),
        (0.45, 10, 5),
        (0.15, 10, 2),
        (0.125, 20, 3),
        (0.24, 10, 2),
        (0.5, 7, 4),
        (0.7, 5, 4),
    ],
)
def test_window_ends_round_half_up(fraction, max_steps, step):
    """x.5 always rounds up, whatever the parity (round() gives 2 for 2.5 and 4 for 3.5), and float noise does not count."""
    schedule = merge_steps(ASLoRAConfig(merge_start=fraction, merge_end=fraction), max_steps)
    assert schedule == [step]


@pytest.mark.parametrize(
    "window, max_steps, expected",
    [
        ((0.6, 1.0), 10, [6, 8]),  # merge_end=1.0 would be step 10, the last step: clamped to 9
        ((1.0, 1.0), 10, [9]),
        ((0.0, 0.0), 10, [1]),  # step 0 is before any training: clamped to 1
        ((0.0, 1.0), 3, [1]),
        ((0.9, 1.0), 4, [3]),
    ],
)
def test_window_is_clamped_so_the_last_merge_is_followed_by_a_training_step(window, max_steps, expected):
    schedule = merge_steps(ASLoRAConfig(merge_start=window[0], merge_end=window[1], merge_every=2), max_steps)
    assert schedule == expected and 1 <= schedule[0] and schedule[-1] <= max_steps - 1


def test_merging_up_to_the_last_step_leaves_one_step_to_train_the_merged_bs(tiny_model):
    adapter, _ = aslora(tiny_model, merge_start=0.5, merge_end=1.0, merge_every=1, target_groups=1)
    merger, optimizer = BMerger(adapter, max_steps=4), torch.optim.AdamW(adapter.parameters())
    merged_at = [step for step in range(1, 5) if merger.after_step(step, optimizer)]
    assert merged_at[-1] == 3 and all(len(g.tensors["lora_B"]) == 1 for g in adapter.groups.values())


def test_aslora_needs_two_steps():
    with pytest.raises(UserError, match="train.max_steps >= 2"):
        merge_steps(ASLoRAConfig(), 1)


def write_recipe(tmp: Path, model_dir: Path, output_dir: Path) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"method": "aslora", "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "aslora": SCHEDULE},
        "data": {"max_length": 160, "overlength": "drop", "max_examples": 120, "validation_fraction": 0.1},
        "train": {
            "max_steps": 8,
            "batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "eval_every": 100,
            "eval_batches": 1,
            "checkpoint_every": 5,
        },
        "output_dir": str(output_dir),
    }
    path = tmp / "aslora.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """An uninterrupted 8-step run, and the same run resumed from checkpoint-5 (after merge 1, before merge 2)."""
    tmp = tmp_path_factory.mktemp("aslora")
    recipe = write_recipe(tmp, tiny_model_dir, tmp / "full")
    summary = train(load_recipe(str(recipe)))
    resumed = tmp / "resumed"  # as if killed after writing checkpoint-5
    shutil.copytree(tmp / "full", resumed)
    shutil.rmtree(resumed / "adapter")
    (resumed / "summary.json").unlink()
    train(load_recipe(str(recipe), [f"output_dir={resumed}", "resume=true"]))
    return {"full": tmp / "full", "resumed": resumed, "recipe": recipe, "trainable": summary.trainable_parameters}


def read_adapter(run: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((run / "adapter" / "sharelora_config.json").read_text())
    return config, load_file(run / "adapter" / "adapter.safetensors")


def test_training_merges_on_schedule_down_to_r_din_plus_k_r_dout(runs, tiny_model_dir):
    config, tensors = read_adapter(runs["full"])
    model = AutoConfig.from_pretrained(tiny_model_dir)
    kv = model.num_key_value_heads * model.head_dim
    shapes = {"q_proj": (128, 128), "v_proj": (128, kv), "down_proj": (model.intermediate_size, 128)}
    k = SCHEDULE["target_groups"]
    expected = sum(RANK * d_in + k * RANK * d_out for d_in, d_out in shapes.values())
    assert runs["trainable"] == config["trainable_parameters"] == sum(t.numel() for t in tensors.values()) == expected
    for _name, entry in config["plan"].items():
        assert len(set(entry["index"]["lora_B"])) == k and set(entry["index"]["lora_A"]) == {0}
        assert [m["step"] for m in entry["merges"]] == [4, 6]
    metrics = [json.loads(line) for line in (runs["full"] / "metrics.jsonl").read_text().splitlines()]
    shrinking = {m["step"]: m["trainable_parameters"] for m in metrics if "trainable_parameters" in m}
    start = sum(RANK * d_in + 4 * RANK * d_out for d_in, d_out in shapes.values())
    assert shrinking == {4: start - sum(RANK * d_out for _, d_out in shapes.values()), 6: expected}


def test_resume_across_a_merge_reproduces_the_uninterrupted_run(runs):
    full_config, full = read_adapter(runs["full"])
    resumed_config, resumed = read_adapter(runs["resumed"])
    checkpoint_plan = json.loads((runs["full"] / "checkpoint-5" / "adapter" / "sharelora_config.json").read_text())[
        "plan"
    ]
    assert [len(e["merges"]) for e in checkpoint_plan.values()] == [1, 1, 1]
    assert resumed_config["plan"] == full_config["plan"]  # same pairs merged, same merge log
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0)


def test_saved_adapter_reloads_merges_and_exports_to_peft_with_the_same_logits(runs, tiny_model_dir, tmp_path):
    from peft import PeftModel

    config, tensors = read_adapter(runs["full"])
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_adapter(loaded, runs["full"] / "adapter")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    per_factor = {
        f: {n: [tensors[f"{n}.{f}.{k}"] for k in range(max(e["index"][f]) + 1)] for n, e in config["plan"].items()}
        for f in ("lora_A", "lora_B")
    }
    fold_lora(reference, config["plan"], per_factor["lora_A"], per_factor["lora_B"])
    expected = logits(reference, 2048)
    torch.testing.assert_close(logits(loaded, 2048), expected, atol=1e-5, rtol=1e-5)

    merge_adapter(runs["full"] / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, 2048), expected, atol=1e-5, rtol=1e-5)

    export_adapter(runs["full"] / "adapter", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft"
    ).eval()
    torch.testing.assert_close(logits(peft_model, 2048), expected, atol=1e-5, rtol=1e-5)


def test_two_processes_merge_the_same_pairs_as_one(runs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "-m",
        "sharelora_cli",
        "train",
        str(runs["recipe"]),
        "train.batch_size=1",
        f"output_dir={tmp_path / 'two'}",
    ]
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    one_config, one = read_adapter(runs["full"])
    two_config, two = read_adapter(tmp_path / "two")
    assert [[m["merged"] for m in e["merges"]] for e in two_config["plan"].values()] == [
        [m["merged"] for m in e["merges"]] for e in one_config["plan"].values()
    ]
    assert {n: e["index"] for n, e in two_config["plan"].items()} == {
        n: e["index"] for n, e in one_config["plan"].items()
    }
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
