"""`sharelora train`: set-up, loop, checkpoint, in that order, on Accelerate.

The loss of a step is the mean over *every target token of the global batch* (all
micro-batches, all processes): each micro-batch's summed loss is divided by the global token
count. Gradient accumulation and any number of processes therefore give the same update as
one process with the whole batch.
"""

import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin, gather_object, set_seed
from tqdm.auto import tqdm

from sharelora_cli.adapters.adapter_io import check_regenerated, copy_tensors, save_adapter
from sharelora_cli.adapters.base import TrainerHook
from sharelora_cli.adapters.fusion import find_shared_inputs
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.adapters.plan import Adapter
from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.config.recipe import Recipe, TrainConfig, to_yaml
from sharelora_cli.core.errors import UserError
from sharelora_cli.core.lr_schedule import make_scheduler
from sharelora_cli.data.examples import IGNORE_INDEX, Example, Splits, StepSampler, collate
from sharelora_cli.evaluation.engine import Engine, context_window
from sharelora_cli.evaluation.humaneval_task import require_permission
from sharelora_cli.evaluation.results import Metric
from sharelora_cli.evaluation.runner import CodeExecution, run_task
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.quantization import bitsandbytes
from sharelora_cli.training.checkpoint import (
    TrainerState,
    checkpoint_plan,
    latest_checkpoint,
    load_checkpoint,
    preserved_rng,
    prune_checkpoints,
    read_starting_point,
    rng_state,
    save_checkpoint,
)
from sharelora_cli.training.data_plan import plan_data
from sharelora_cli.training.liger import apply_liger_kernel, require_liger_kernel
from sharelora_cli.training.metrics_log import METRICS_FILE, MetricsLog, strict_json, trackers, truncate_metrics
from sharelora_cli.training.progress import Progress
from sharelora_cli.training.run_lock import RunLock
from sharelora_cli.training.sharding import (
    Distribution,
    check_fsdp2_quantization,
    check_fsdp2_settings,
    gathered,
    gathered_optimizer_state,
    gradient_sync,
    norm_value,
    resolve,
    shard,
    shard_optimizer_state,
    take_launch_request,
)

EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Written last when a run finishes: its presence says the run is complete.
SUMMARY_FILE = "summary.json"


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop finished its step and wrote a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        self.exit_code = EXIT_CODES[signum]
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after {checkpoint.name}; "
            "continue with the same command plus resume=true"
        )


@dataclass
class RunSummary:
    steps: int
    tokens: int
    seconds: float
    peak_memory_bytes: int
    trainable_parameters: int
    final_loss: float
    final_val_loss: float | None
    output_dir: str
    is_main_process: bool
    # How the run was distributed: "single", "ddp" or "fsdp2", over this many processes.
    strategy: str
    processes: int
    # Passes over the training examples (blocks when packed) the steps made.
    epochs: float = 0.0


@dataclass
class Session:
    """Everything one training run holds between its set-up and its end."""

    recipe: Recipe
    accelerator: Accelerator
    tokenizer: Any
    splits: Splits
    model: torch.nn.Module
    adapter: Adapter
    hook: TrainerHook | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: StepSampler
    log: MetricsLog
    state: TrainerState
    code: CodeExecution
    distribution: Distribution

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)


def train(recipe: Recipe, code: CodeExecution = CodeExecution()) -> RunSummary:
    """Train an adapter as the recipe says; resumable, and safe to kill at any point.

    code: whether HumanEval in train.eval_tasks may run model-written code (the CLI's --allow-code-execution).
    """
    refuse_finished_run(recipe)
    lock = RunLock(Path(recipe.output_dir))
    try:
        return run_training(recipe, code, lock)
    finally:
        lock.release()


def run_training(recipe: Recipe, code: CodeExecution, lock: RunLock) -> RunSummary:
    run = set_up(recipe, code, lock)
    cfg = run.recipe.train  # max_steps resolved from train.num_epochs
    progress = Progress(cfg.max_steps, run.state.step, run.accelerator.is_local_main_process)
    record: dict = {"loss": math.nan}
    val_loss = None
    with StopSignal() as stop, progress:
        while run.state.step < cfg.max_steps:
            record = run_step(run)
            val_loss = record.get("val_loss", val_loss)
            progress.update(record, is_logged(record, cfg.log_every))
            if run.state.step % cfg.checkpoint_every == 0 or stop.signum is not None:
                checkpoint = write_checkpoint(
                    run.output_dir, run.state, run.adapter, run.optimizer, run.scheduler, run.accelerator, recipe
                )
                if stop.signum is not None:
                    raise Interrupted(stop.signum, checkpoint)
    return finish(run, record["loss"], val_loss)


def set_up(recipe: Recipe, code: CodeExecution, lock: RunLock) -> Session:
    """Check the output directory, load data, model and adapter, and restore the newest checkpoint when resuming."""
    cfg = recipe.train
    method = METHODS[recipe.adapter.method]
    if "humaneval" in cfg.eval_tasks:
        require_permission(code.allowed, code.weak_sandbox)
    output_dir = Path(recipe.output_dir)
    launch = take_launch_request(os.environ)
    accelerator = make_accelerator(cfg, output_dir, find_unused_parameters=method.drops_parameters)
    distribution = resolve(cfg.distributed, launch, accelerator.num_processes)
    accelerator.print(distribution.describe())
    check_fsdp2_settings(cfg, distribution)
    check_fsdp2_quantization(recipe.quantization, accelerator.mixed_precision, distribution)
    if cfg.liger_kernel:
        require_liger_kernel(accelerator.device)
    resume_from = prepare_output_dir(recipe, accelerator, lock)
    start = read_starting_point(recipe.adapter) if recipe.adapter.init_from and resume_from is None else None
    set_seed(cfg.seed)

    # Before the model loads: bad data or a batch larger than the data stops the run in seconds.
    data = plan_data(recipe, accelerator.num_processes, accelerator.process_index, accelerator.print)
    recipe, tokenizer, splits, sampler = data.recipe, data.tokenizer, data.splits, data.sampler
    cfg = recipe.train
    model = load_model(recipe.model, recipe.quantization, accelerator.device, distribution.strategy == "fsdp2")
    plan = checkpoint_plan(resume_from, recipe.adapter) if resume_from else start.plan if start else None
    adapter = inject_adapter(model, recipe.adapter, plan=plan)
    if start is not None:
        check_regenerated(adapter.regenerated_record(), start.config, start.source)
        copy_tensors(adapter, start.tensors)
    hook = method.make_trainer_hook(adapter, cfg.max_steps) if method.make_trainer_hook else None
    if cfg.liger_kernel:
        apply_liger_kernel(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    find_shared_inputs(model, accelerator.device)
    if distribution.strategy == "fsdp2":
        shard(model, adapter, distribution, accelerator.device, accelerator.mixed_precision)
    optimizer = make_optimizer(adapter, cfg, accelerator.device)
    scheduler = make_scheduler(cfg.scheduler, optimizer, cfg.warmup_steps, cfg.max_steps)
    if distribution.strategy == "fsdp2":
        optimizer = accelerator.prepare(optimizer)  # the model is sharded already: no DDP wrapper
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if start is not None and start.optimizer_state is not None:
        optimizer.load_state_dict(start.optimizer_state)
        shard_optimizer_state(optimizer)

    state = TrainerState()
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, adapter, optimizer, scheduler, accelerator.process_index, accelerator.num_processes
        )
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    if accelerator.is_main_process:
        truncate_metrics(output_dir / METRICS_FILE, state.step)
    accelerator.print(
        f"trainable parameters: {adapter.num_trainable()} ({recipe.adapter.method}, rank {recipe.adapter.rank})"
    )
    return Session(
        recipe,
        accelerator,
        tokenizer,
        splits,
        model,
        adapter,
        hook,
        optimizer,
        scheduler,
        sampler,
        MetricsLog(
            output_dir,
            accelerator,
            recipe.model_dump(),
            {"strategy": distribution.strategy, "processes": distribution.processes},
        ),
        state,
        code,
        distribution,
    )


def run_step(run: Session) -> dict:
    """One optimizer step, the method's hook, validation when due, and the log; returns the step's record."""
    cfg, state = run.recipe.train, run.state
    started = time.perf_counter()
    # The rate this step applies: the scheduler moves on to the next step's inside train_step.
    lr = run.scheduler.get_last_lr()[0]
    micro = [[run.splits.train[i] for i in idx] for idx in run.sampler.micro_batches(state.step)]
    batches = [collate(examples, run.tokenizer.pad_token_id) for examples in micro]
    rows = [ex.row for examples in micro for ex in examples]
    loss, tokens, grad_norm = train_step(
        run.model, batches, run.adapter, run.optimizer, run.scheduler, run.accelerator, cfg, state.step, rows
    )
    state.step += 1
    state.tokens_seen += tokens
    state.elapsed_s += time.perf_counter() - started
    record = {
        "step": state.step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": state.tokens_seen,
        "tokens_per_s": tokens / (time.perf_counter() - started),
        "epoch": run.sampler.epoch_of(state.step),
    }
    if run.hook is not None and run.hook.after_step(state.step, run.optimizer):
        record["trainable_parameters"] = run.adapter.num_trainable()
    if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
        record["val_loss"] = validation_loss(run.model, run.splits.validation, run.tokenizer, cfg, run.accelerator)
        record.update(evaluate_during_training(run))
    if is_logged(record, cfg.log_every):
        run.log.write(record)
    return record


def is_logged(record: dict, log_every: int) -> bool:
    """Whether a step goes to metrics.jsonl: every log_every steps, and whenever it validated or merged."""
    return record["step"] % log_every == 0 or "val_loss" in record or "trainable_parameters" in record


class AlreadyFinished(Exception):
    """resume=true on a run that already reached its last step: nothing is trained and no file changes."""


def refuse_finished_run(recipe: Recipe) -> None:
    """Stop before anything is written when resuming a run whose summary.json already counts every step."""
    summary_file = Path(recipe.output_dir) / SUMMARY_FILE
    if not recipe.resume or not summary_file.is_file():
        return
    done = json.loads(summary_file.read_text())
    cfg = recipe.train
    if cfg.num_epochs is None:
        finished, target = done.get("steps", 0) >= cfg.max_steps, f"train.max_steps={cfg.max_steps}"
    else:  # the epochs its steps covered (summary.json's epochs), with room for the rounding of that division
        finished, target = done.get("epochs", 0) >= cfg.num_epochs * (1 - 1e-9), f"train.num_epochs={cfg.num_epochs}"
    if finished:
        raise AlreadyFinished(
            f"{recipe.output_dir} already finished at step {done['steps']} ({target}); "
            f"nothing to do: raise {target.partition('=')[0]} to train further, or choose another output_dir"
        )


def evaluate_during_training(run: Session) -> dict[str, Metric]:
    """train.eval_tasks on the model being trained, on the main process; "task/metric" -> value.

    Sampling and eval.seed move the global RNGs, which dropout and the data order also draw from: they are
    restored afterwards, so the run's losses are the same with and without these evaluations.
    """
    tasks, metrics = run.recipe.train.eval_tasks, {}
    if tasks and run.accelerator.is_main_process:
        model = run.accelerator.unwrap_model(run.model)
        cfg = run.recipe.eval
        engine = Engine(model, run.tokenizer, cfg.batch_size, context_window(model, cfg.max_length))
        with preserved_rng():
            for task in tasks:
                scores = run_task(task, engine, cfg, run.code, data_format=run.recipe.data.format).metrics
                metrics.update(
                    {f"{task}/{name}": value for name, value in scores.items() if not name.startswith("subject/")}
                )
        model.train()
    if tasks:
        run.accelerator.wait_for_everyone()
    return metrics


def finish(run: Session, loss: float, val_loss: float | None) -> RunSummary:
    """Write the adapter, tokenizer and summary (main process), once every process is done."""
    accelerator, output_dir = run.accelerator, run.output_dir
    summary = RunSummary(
        run.state.step,
        run.state.tokens_seen,
        run.state.elapsed_s,
        peak_memory(accelerator.device),
        run.adapter.num_trainable(),
        loss,
        val_loss,
        str(output_dir),
        accelerator.is_main_process,
        run.distribution.strategy,
        run.distribution.processes,
        run.sampler.epoch_of(run.state.step),
    )
    whole = gathered(run.adapter)
    if accelerator.is_main_process:
        # data_format: `eval` (eval.prompt_format=train) puts questions to the adapter in the format it learnt.
        save_adapter(
            whole,
            output_dir / "adapter",
            base_model=run.recipe.model.name_or_path,
            extra={**quantization_note(run.recipe), "data_format": run.recipe.data.format},
        )
        run.tokenizer.save_pretrained(output_dir / "tokenizer")
        (output_dir / SUMMARY_FILE).write_text(json.dumps(strict_json(summary.__dict__), indent=2) + "\n")
    run.log.close()
    accelerator.wait_for_everyone()
    return summary


def make_accelerator(cfg: TrainConfig, output_dir: Path, find_unused_parameters: bool = False) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[ddp],
        log_with=trackers(cfg.report_to, output_dir) or None,
        project_dir=str(output_dir),
        dynamo_plugin=dynamo_plugin(cfg),
    )


def dynamo_plugin(cfg: TrainConfig) -> TorchDynamoPlugin:
    """How Accelerate's prepare() compiles the model: not at all unless train.compile is set."""
    if cfg.cuda_graphs and not cfg.compile:
        raise UserError("train.cuda_graphs captures the graphs torch.compile makes: set train.compile=true too")
    if cfg.cuda_graphs and not torch.cuda.is_available():
        raise UserError("train.cuda_graphs needs a CUDA GPU; set train.cuda_graphs=false")
    if not cfg.compile:
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend="inductor", mode="reduce-overhead" if cfg.cuda_graphs else "default")


def prepare_output_dir(recipe: Recipe, accelerator: Accelerator, lock: RunLock) -> Path | None:
    """Check the output directory is writable, lock it for this run, decide what to resume from; write recipe.yaml."""
    output_dir = Path(recipe.output_dir)
    latest = check_output_dir(recipe)
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
            lock.acquire()
            (output_dir / "recipe.yaml").write_text(to_yaml(recipe))
        except OSError as err:
            raise UserError(
                f"output_dir {output_dir} is not writable ({err.strerror}); choose another output_dir"
            ) from None
    accelerator.wait_for_everyone()
    return latest if recipe.resume else None


def check_output_dir(recipe: Recipe) -> Path | None:
    """Refuse an output_dir holding another run unless resuming it; returns its newest checkpoint. Reads only."""
    output_dir = Path(recipe.output_dir)
    latest = latest_checkpoint(output_dir) if output_dir.is_dir() else None
    if latest is not None and not recipe.resume:
        raise UserError(
            f"output_dir {output_dir} already holds {latest.name}; pass resume=true to continue it, or choose another output_dir"
        )
    if (output_dir / "adapter").is_dir() and latest is None and not recipe.resume:
        raise UserError(f"output_dir {output_dir} already holds a finished run; choose another output_dir")
    return latest


def make_optimizer(adapter: Adapter, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = adapter.parameters()
    if cfg.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise UserError("train.optimizer=paged_adamw_8bit needs a CUDA GPU; use train.optimizer=adamw on CPU")
        return bitsandbytes().optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return adamw(params, cfg.lr, cfg.weight_decay)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as one fused kernel over every tensor: torch's default on CPU loops over the tensors at
    about ten dispatches each, more than an adapted module's whole forward and backward."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def train_step(
    model, batches, adapter, optimizer, scheduler, accelerator, cfg: TrainConfig, step: int, rows: list[int | None]
):
    """One optimizer step over grad_accum micro-batches; returns (global mean loss, global tokens, grad norm).

    rows: the data rows of this process's examples, to name them if the loss is not finite.
    """
    counts = torch.tensor(
        [float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
        + [float(sum(int(b["attention_mask"].sum()) for b in batches))]
    )
    counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
    target_tokens, input_tokens = counts[:-1].sum(), int(counts[-1])
    total_loss = torch.zeros((), device=accelerator.device)
    model.train()
    for i, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = i == len(batches) - 1
        with gradient_sync(model, accelerator, sync):
            summed = token_loss_sum(model, batch, fused_loss=cfg.liger_kernel)
            # DDP averages gradients over processes, so scale by their number to get the global token mean.
            accelerator.backward(summed * accelerator.num_processes / target_tokens)
        total_loss += summed.detach()
    loss = float(accelerator.reduce(total_loss, reduction="sum") / target_tokens)
    # A finite loss can still overflow in backward, so the gradient norm is checked too (max_grad_norm
    # unset: measured against inf, which scales nothing); with fp16 the GradScaler skips such steps itself.
    grad_norm = norm_value(accelerator.clip_grad_norm_(adapter.parameters(), cfg.max_grad_norm or math.inf))
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and accelerator.scaler is None):
        return handle_nonfinite(loss, grad_norm, optimizer, scheduler, cfg, step, input_tokens, rows)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, input_tokens, grad_norm


def handle_nonfinite(
    loss: float,
    grad_norm: float,
    optimizer,
    scheduler,
    cfg: TrainConfig,
    step: int,
    tokens: int,
    rows: list[int | None],
):
    """Stop, or skip the update, when the loss or the gradient norm is not finite."""
    optimizer.zero_grad(set_to_none=True)
    what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm}) at finite loss {loss:.4f}"
    where = f"at step {step + 1} (batch of data rows {[row + 1 if row is not None else None for row in rows]})"
    if cfg.on_nonfinite == "stop":
        raise UserError(
            f"non-finite {what} {where}; stopped, the last checkpoint is kept. "
            "Check those rows, lower train.lr, or set train.on_nonfinite=skip to skip such steps"
        )
    tqdm.write(f"warning: non-finite {what} {where}; step skipped")
    scheduler.step()
    return loss, tokens, None


def token_loss_sum(model, batch: dict[str, torch.Tensor], fused_loss: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's target tokens.

    fused_loss: the model's forward computes it from labels (Liger's fused linear cross-entropy, liger.py),
    never building the logits; num_items_in_batch=1 makes it return the sum rather than the mean.
    """
    if fused_loss:
        return model(**model_inputs(batch), labels=batch["labels"], num_items_in_batch=1, use_cache=False).loss
    logits = model(**model_inputs(batch), use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model is given: the padding mask, or for packed blocks the per-example position ids alone.

    Given position ids that restart at 0, no attention mask and no KV cache, transformers (>= 4.55) builds
    sdpa and eager masks that attend only within each packed example, and flash-attention's varlen path
    takes the same boundaries. A 2D mask (or a cache) turns that off: a block's examples would see each other.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def validation_loss(
    model, examples: list[Example], tokenizer, cfg: TrainConfig, accelerator: Accelerator
) -> float | None:
    """Token-weighted mean loss over a fixed validation subset: eval_batches global batches."""
    if not examples:
        return None
    model.eval()
    chosen = examples[: cfg.eval_batches * cfg.batch_size * accelerator.num_processes]
    mine = chosen[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(2, device=accelerator.device)
    # Every process runs as many forwards as the one with most examples: under FSDP2 a forward gathers
    # weights from all of them. One left without examples runs the first one again and counts nothing.
    batches = math.ceil(math.ceil(len(chosen) / accelerator.num_processes) / cfg.batch_size)
    for start in range(0, batches * cfg.batch_size, cfg.batch_size):
        part = mine[start : start + cfg.batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate(part or chosen[:1], tokenizer.pad_token_id).items()}
        summed = token_loss_sum(model, batch)
        if part:
            totals[0] += summed
            totals[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    return float(totals[0] / totals[1])


def write_checkpoint(output_dir, state, adapter, optimizer, scheduler, accelerator, recipe: Recipe) -> Path:
    rng_states = gather_object([rng_state()])
    target = output_dir / f"checkpoint-{state.step}"
    whole, optimizer_state = gathered(adapter), gathered_optimizer_state(optimizer)
    if accelerator.is_main_process:
        save_checkpoint(
            output_dir,
            state,
            whole,
            optimizer_state,
            scheduler,
            rng_states,
            extra={
                "base_model": recipe.model.name_or_path,
                **quantization_note(recipe),
                "data_format": recipe.data.format,
            },
        )
        prune_checkpoints(output_dir, recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return target


def quantization_note(recipe: Recipe) -> dict:
    """Recorded with the adapter so merge and eval know the base it was trained on."""
    return {"quantization": recipe.quantization.model_dump() if recipe.quantization.load_in_4bit else None}


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StopSignal:
    """While active, SIGINT/SIGTERM only set a flag, so the loop can finish its step and checkpoint."""

    def __enter__(self) -> "StopSignal":
        self.signum: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in EXIT_CODES}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
