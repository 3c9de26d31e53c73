"""Resumable checkpoints: adapter, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint directory `checkpoint-N` exists only once it is complete (see atomic.py), so the
newest one found is always safe to resume from.
"""

import io
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from sharelora_cli.adapters.adapter_io import (
    CONFIG_FILE,
    check_regenerated,
    copy_tensors,
    read_adapter_config,
    read_adapter_tensors,
    read_checked_tensors,
    save_adapter,
)
from sharelora_cli.adapters.plan import Adapter
from sharelora_cli.config.recipe import AdapterConfig
from sharelora_cli.core.atomic import atomic_directory, remove_directory, remove_stale_staging
from sharelora_cli.core.errors import UserError, first_line
from sharelora_cli.training.sharding import shard_optimizer_state

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


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving this process's random number generators (Python, NumPy, torch, CUDA)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def save_checkpoint(
    output_dir: Path,
    state: TrainerState,
    adapter: Adapter,
    optimizer_state: dict,
    scheduler,
    rng_states: list[dict],
    extra: dict,
) -> Path:
    """Write checkpoint-N atomically; on failure the previous checkpoints are untouched.

    adapter and optimizer_state hold whole tensors (training/sharding.py gathers them under FSDP2), so a
    checkpoint's files are the same however the run was distributed.
    """
    target = Path(output_dir) / f"checkpoint-{state.step}"
    try:
        with atomic_directory(target, replace=True) as staging:
            save_adapter(adapter, staging / "adapter", extra=extra)
            (staging / "optimizer.pt").write_bytes(torch_bytes(optimizer_state))
            (staging / "scheduler.pt").write_bytes(torch_bytes(scheduler.state_dict()))
            (staging / "rng.pt").write_bytes(torch_bytes(rng_states))
            (staging / STATE_FILE).write_text(json.dumps(state.__dict__, indent=2) + "\n")
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        raise write_failure(target, first_line(err), output_dir) from None
    return target


def write_failure(path: Path, reason: str, output_dir: Path) -> UserError:
    """The error for a run's output that could not be written: what failed, and what is left to resume from."""
    previous = latest_checkpoint(output_dir)
    kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
    return UserError(f"could not write {path}: {reason}; {kept}. Free space, then resume with resume=true")


def torch_bytes(obj) -> bytes:
    """torch.save into memory: writing the bytes ourselves turns a full disk into an OSError naming the file,
    where torch.save to a path raises an opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoint directories of a run, oldest step first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(output_dir).glob("checkpoint-*")
        if (m := CHECKPOINT_PATTERN.fullmatch(p.name))
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for path in checkpoints(output_dir)[:-keep]:
        remove_directory(path)
    remove_stale_staging(output_dir)


def checkpoint_plan(path: Path, config: AdapterConfig) -> dict:
    """The sharing plan to resume with: the checkpoint's, since a method may change it while training (ASLoRA)."""
    saved = read_adapter_config(path / "adapter")
    recorded = AdapterConfig.model_validate(saved["adapter"])
    changed = [key for key in AdapterConfig.model_fields if getattr(recorded, key) != getattr(config, key)]
    if changed:
        raise UserError(
            f"checkpoint {path} was written with a different adapter.{changed[0]}; "
            "restore the recipe's adapter section or start a new output_dir"
        )
    return saved["plan"]


def load_checkpoint(path: Path, adapter: Adapter, optimizer, scheduler, rank: int, processes: int) -> TrainerState:
    """Restore tensors, optimizer, scheduler and this process's RNG; return the trainer state.

    A run continues with the process count that wrote the checkpoint: the global batch, the data each
    process reads and each process's random numbers depend on it.
    """
    state = read_checkpoint_file(path / STATE_FILE, lambda file: TrainerState(**json.loads(file.read_text())))
    tensors = read_adapter_tensors(path / "adapter")
    optimizer_state, scheduler_state, rng_states = (
        read_checkpoint_file(path / name, lambda file: torch.load(file, weights_only=False))
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt")
    )
    if len(rng_states) != processes:
        raise UserError(
            f"checkpoint {path} was written by {len(rng_states)} process(es), this run has {processes}; "
            f"resume with --num_processes {len(rng_states)}, or start a new output_dir"
        )
    if set(adapter.named_tensors()) != set(tensors):
        raise UserError(f"checkpoint {path} was written for a different adapter; start a new output_dir")
    check_regenerated(
        adapter.regenerated_record(), read_adapter_config(path / "adapter"), path / "adapter" / CONFIG_FILE
    )
    copy_tensors(adapter, tensors)
    optimizer.load_state_dict(optimizer_state)
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(rng_states[rank])
    return state


def read_checkpoint_file(path: Path, reader):
    """reader(path), with any failure reported as one line naming the file."""
    try:
        return reader(path)
    except Exception as err:  # torch.load and json raise many types on truncated or corrupt files
        raise UserError(
            f"checkpoint file {path} is unreadable ({first_line(err)}); delete {path.parent} to resume from an earlier checkpoint"
        ) from None


# Adapter settings a run may change when it continues a saved adapter; every other one fixes the function
# the adapter computes (method, rank, alpha, targets, a method's own section) and must stay as saved.
CHANGEABLE_SETTINGS = frozenset({"dropout", "aslora", "init_from", "init_optimizer"})


@dataclass
class StartingPoint:
    """A saved adapter a run starts from (adapter.init_from): its config, plan, tensors and, if asked, optimizer state."""

    config: dict
    source: Path
    tensors: dict[str, torch.Tensor]
    optimizer_state: dict | None

    @property
    def plan(self) -> dict:
        return self.config["plan"]


def read_starting_point(config: AdapterConfig) -> StartingPoint:
    """adapter.init_from, read and checked against the recipe's adapter before any model is loaded."""
    assert config.init_from is not None  # read only when the recipe names a starting point
    directory = Path(config.init_from)
    adapter_dir = directory if (directory / CONFIG_FILE).is_file() else directory / "adapter"
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise UserError(
            f"adapter.init_from: {directory} holds no sharelora adapter ({CONFIG_FILE} there or in its adapter/)"
        )
    saved = read_adapter_config(adapter_dir)
    recorded = AdapterConfig.model_validate(saved["adapter"])
    for key in AdapterConfig.model_fields:
        if key not in CHANGEABLE_SETTINGS and getattr(recorded, key) != getattr(config, key):
            raise UserError(
                f"adapter.init_from: {adapter_dir} was trained with adapter.{key}={getattr(recorded, key)!r}, "
                f"this recipe has {getattr(config, key)!r}; make them equal to continue it"
            )
    _, tensors = read_checked_tensors(adapter_dir, saved)
    optimizer_state = None
    if config.init_optimizer:
        path = directory / "optimizer.pt"
        if not path.is_file():
            raise UserError(
                f"adapter.init_optimizer needs a checkpoint-N directory as adapter.init_from: {path} not found"
            )
        optimizer_state = read_checkpoint_file(path, lambda file: torch.load(file, weights_only=False))
    return StartingPoint(saved, adapter_dir / CONFIG_FILE, tensors, optimizer_state)
