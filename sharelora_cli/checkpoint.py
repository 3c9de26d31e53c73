"""Resumable checkpoints: adapter, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint directory `checkpoint-N` exists only once it is complete (see atomic.py), so the
newest one found is always safe to resume from.
"""

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sharelora_cli.adapter_io import read_adapter_config, read_adapter_tensors, save_adapter
from sharelora_cli.atomic import atomic_directory, remove_stale_staging
from sharelora_cli.errors import UserError, first_line
from sharelora_cli.inject import Adapter
from sharelora_cli.recipe import AdapterConfig

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Everything the loop needs to continue besides tensors: the data position is the step."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path, state: TrainerState, adapter: Adapter, optimizer, scheduler, rng_states: list[dict], extra: dict
) -> Path:
    """Write checkpoint-N atomically; on failure the previous checkpoints are untouched."""
    target = Path(output_dir) / f"checkpoint-{state.step}"
    try:
        with atomic_directory(target, replace=True) as staging:
            save_adapter(adapter, staging / "adapter", extra=extra)
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            torch.save(rng_states, staging / "rng.pt")
            (staging / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2) + "\n")
    except OSError as err:
        previous = latest_checkpoint(output_dir)
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"could not write {target}: {first_line(err)}; {kept}. Free space, then resume with resume=true") from None
    return target


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    found = sorted(int(m.group(1)) for p in Path(output_dir).glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))
    for step in found[:-keep]:
        shutil.rmtree(Path(output_dir) / f"checkpoint-{step}", ignore_errors=True)
    remove_stale_staging(output_dir)


def checkpoint_plan(path: Path, config: AdapterConfig) -> dict:
    """The sharing plan to resume with: the checkpoint's, since a method may change it while training (ASLoRA)."""
    saved = read_adapter_config(path / "adapter")
    recorded = AdapterConfig.model_validate(saved["adapter"])
    changed = [key for key in AdapterConfig.model_fields if getattr(recorded, key) != getattr(config, key)]
    if changed:
        raise UserError(f"checkpoint {path} was written with a different adapter.{changed[0]}; "
                        "restore the recipe's adapter section or start a new output_dir")
    return saved["plan"]


def load_checkpoint(path: Path, adapter: Adapter, optimizer, scheduler, rank: int) -> TrainerState:
    """Restore tensors, optimizer, scheduler and this process's RNG; return the trainer state."""
    try:
        state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        tensors = read_adapter_tensors(path / "adapter")
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
        scheduler_state = torch.load(path / "scheduler.pt", weights_only=False)
        rng_states = torch.load(path / "rng.pt", weights_only=False)
    except UserError:
        raise
    except Exception as err:  # torch.load and json raise many types on truncated files
        raise UserError(f"checkpoint {path} is unreadable ({first_line(err)}); delete it to resume from an earlier one") from None
    named = adapter.named_tensors()
    if set(named) != set(tensors):
        raise UserError(f"checkpoint {path} was written for a different adapter; start a new output_dir")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(rng_states[rank])
    return state
