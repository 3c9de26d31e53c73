"""Hostile recipes, kills, full disks, non-finite losses and corrupt checkpoints: each run either
fails with one line naming the cause or resumes to exactly the weights of an uninterrupted run."""

import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_train import read_metrics, write_recipe

from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import Recipe, load_recipe
from sharelora_cli.core.errors import UserError
from sharelora_cli.core.lr_schedule import make_scheduler
from sharelora_cli.core.paths import RECIPES_DIR
from sharelora_cli.data.examples import StepSampler, build_splits
from sharelora_cli.models.loading import load_tokenizer
from sharelora_cli.training.checkpoint import checkpoint_plan, load_checkpoint
from sharelora_cli.training.loop import train

SHARELORA = [sys.executable, "-m", "sharelora_cli"]
CHECKPOINT_FILES = (
    "adapter/adapter.safetensors",
    "adapter/sharelora_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "trainer_state.json",
)
STEPS = 8
# Small enough that a step takes well under a second on 2 cores; dropout makes resume depend on the RNG state.
SMALL = {
    "adapter": {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"]},
    "data": {"max_length": 128, "max_examples": 60},
    "train": {
        "max_steps": STEPS,
        "batch_size": 2,
        "warmup_steps": 1,
        "eval_every": 100,
        "eval_batches": 1,
        "checkpoint_every": 1,
        "keep_checkpoints": STEPS,
    },
}


def small_recipe(tmp_path: Path, model_dir: Path, **train_values) -> Path:
    return write_recipe(
        tmp_path, model_dir, adapter=SMALL["adapter"], data=SMALL["data"], train={**SMALL["train"], **train_values}
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    """An uninterrupted run, keeping a checkpoint after every step."""
    directory = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(str(small_recipe(directory, tiny_model_dir)))
    train(recipe)
    return Path(recipe.output_dir)


def assert_same_adapter(run: Path, expected_dir: Path) -> None:
    expected = load_file(expected_dir / "adapter.safetensors")
    got = load_file(run / "adapter" / "adapter.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=0, atol=1e-6), name


def assert_checkpoints_complete(run: Path) -> list[int]:
    """Every checkpoint-N directory holds all its files and loads; returns the steps found."""
    steps = []
    for checkpoint in run.glob("checkpoint-*"):
        assert all((checkpoint / name).is_file() for name in CHECKPOINT_FILES), sorted(checkpoint.rglob("*"))
        load_file(checkpoint / "adapter" / "adapter.safetensors")
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(checkpoint / name, weights_only=False)
        steps.append(int(checkpoint.name.split("-")[1]))
    return sorted(steps)


# --- recipes and overrides --------------------------------------------------------------------

SHIPPED = [yaml.safe_load(path.read_text()) for path in sorted(RECIPES_DIR.glob("*.yaml"))]
SHIPPED_TEXT = [path.read_text() for path in sorted(RECIPES_DIR.glob("*.yaml"))]
KEYS = sorted(
    {
        f"{section}.{key}"
        for recipe in SHIPPED
        for section, values in recipe.items()
        if isinstance(values, dict)
        for key in values
    }
    | {"output_dir", "resume", "eval.tasks", "eval.mmlu.subjects"}
)
INTERPOLATIONS = [
    "${data:gsm8k/train.jsonl}",
    "${data:}",
    "${data:${data:x}}",
    "${foo}",
    "${",
    "${oc.env:NO_SUCH_VAR}",
    "${oc.decode:'[1'}",
    "${train.lr}",
    "${output_dir}",
    "${.}",
    "${nope:x}",
    "$${data:x}",
    "}{",
]
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.floats(),
    text,
    st.sampled_from(INTERPOLATIONS),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=10
)


@st.composite
def mutated_recipe(draw) -> str:
    """A shipped recipe with keys deleted, retyped, added or whole sections replaced."""
    recipe = draw(st.sampled_from(SHIPPED))
    recipe = {section: dict(body) if isinstance(body, dict) else body for section, body in recipe.items()}
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*sorted(recipe), "bogus"]))
        body = recipe.get(section)
        operation = draw(st.sampled_from(["delete", "set", "replace section"]))
        if operation == "delete":
            if isinstance(body, dict) and body:
                body.pop(draw(st.sampled_from(sorted(body))))
            else:
                recipe.pop(section, None)
        elif operation == "set" and isinstance(body, dict):
            body[draw(st.sampled_from(sorted(body) or ["x"]) | text)] = draw(values)
        else:
            recipe[section] = draw(values)
    return yaml.safe_dump(recipe, allow_unicode=True)


@st.composite
def damaged_text(draw) -> str:
    """A shipped recipe's text cut short, or with random characters spliced in."""
    source = draw(st.sampled_from(SHIPPED_TEXT))
    cut = draw(st.integers(0, len(source)))
    return source[:cut] + draw(text) + source[cut + draw(st.integers(0, 40)) :]


NON_MAPPINGS = [
    "",
    "42\n",
    "null\n",
    "- adapter\n- train\n",
    "just a string",
    "a: 1\n---\nb: 2\n",
    "!!python/object/apply:os.system ['true']\n",
    "train: [1, 2]\n",
    "adapter: " + "[" * 3000 + "]" * 3000,
    "train:\n  lr: " + "9" * 5000 + "\n",
    "&a [*a]\n",
]
documents = st.one_of(mutated_recipe(), damaged_text(), st.sampled_from(NON_MAPPINGS), text)
override_values = st.one_of(
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()),
    text,
    st.sampled_from(INTERPOLATIONS),
)
override = st.one_of(
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from(KEYS) | text, override_values), text
)


@contextmanager
def no_hang(seconds: int):
    """Fail instead of waiting forever: SIGALRM interrupts whatever is running."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@settings(
    max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(document=documents, overrides=st.lists(override, max_size=3))
def test_any_recipe_and_overrides_load_or_fail_with_one_line(tmp_path, document, overrides):
    path = tmp_path / "fuzzed.yaml"
    path.write_text(document, encoding="utf-8")
    with no_hang(10):
        try:
            assert isinstance(load_recipe(str(path), overrides), Recipe)
        except UserError as err:
            assert len(str(err).splitlines()) == 1, str(err)


@pytest.mark.parametrize(
    "setting, key", [("train:\n  lr: .inf\n", "train.lr"), ("adapter:\n  alpha: .nan\n", "adapter.alpha")]
)
def test_infinite_or_nan_settings_are_rejected(tmp_path, setting, key):
    path = tmp_path / "recipe.yaml"
    path.write_text(setting)
    with pytest.raises(UserError, match=f"^{path}: {key}: "):
        load_recipe(str(path))


@pytest.mark.parametrize(
    "document, overrides",
    [
        ("adapter: " + "[" * 3000 + "]" * 3000, []),
        ("adapter:\n  method: sharea\n", ["adapter.targets[5]=x", "adapter.rank=" + "9" * 5000]),
    ],
    ids=["deep nesting", "clashing and huge overrides"],
)
def test_show_reports_hostile_recipes_in_one_line(tmp_path, document, overrides):
    path = tmp_path / "hostile.yaml"
    path.write_text(document)
    # Which of YAML, OmegaConf or Python gives up first depends on their versions; the report names the culprit.
    line = assert_one_line_error(run_cli("show", str(path), *overrides))
    assert str(path) in line or line.startswith("error: overrides: ")


# --- kills and signals ------------------------------------------------------------------------


def start_training(recipe: Path, run: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [*SHARELORA, "train", str(recipe), f"output_dir={run}", *extra],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_for(condition, proc: subprocess.Popen, poll: float = 0.002) -> None:
    deadline = time.time() + 300
    while not condition():
        assert proc.poll() is None, f"training ended early with exit code {proc.returncode}"
        assert time.time() < deadline, "timed out waiting for training"
        time.sleep(poll)


def logged_steps(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    return [int(m.group(1)) for m in re.finditer(r'"step": (\d+)', metrics.read_text())] if metrics.is_file() else []


def stepped_after_resume(run: Path, log: Path) -> bool:
    """The resumed process is inside its loop and has logged a step of its own.

    "trainable parameters" is printed after the metrics log was cut back to the checkpoint's step,
    so any later line past that step is new.
    """
    output = log.read_text()
    resumed = re.search(r"resumed from \S+ at step (\d+)", output)
    return (
        bool(resumed) and "trainable parameters" in output and max(logged_steps(run), default=0) > int(resumed.group(1))
    )


def test_sigkill_mid_write_mid_step_and_sigint_then_resume_match_uninterrupted_run(tmp_path, tiny_model_dir, reference):
    rng = random.Random(8)
    recipe = small_recipe(tmp_path, tiny_model_dir, keep_checkpoints=2)
    run, log = tmp_path / "run", tmp_path / "train.log"

    # 1. SIGKILL while checkpoint-2 is being written: its staging directory exists, the rename has not happened.
    proc = start_training(recipe, run, log)
    wait_for(lambda: any(run.glob(".checkpoint-2.tmp-*")), proc, poll=0.0005)
    time.sleep(rng.uniform(0, 0.005))
    proc.kill()
    proc.wait()
    assert assert_checkpoints_complete(run)[0] == 1

    # 2. SIGKILL at a random moment after the first resumed step: inside a step or a checkpoint write.
    proc = start_training(recipe, run, log, "resume=true")
    wait_for(lambda: stepped_after_resume(run, log), proc)
    time.sleep(rng.uniform(0, 0.3))
    proc.kill()
    proc.wait()
    assert assert_checkpoints_complete(run)

    # 3. SIGINT: the step finishes, a checkpoint is written, exit 130 says how to continue.
    proc = start_training(recipe, run, log, "resume=true")
    wait_for(lambda: stepped_after_resume(run, log), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
    last = assert_checkpoints_complete(run)[-1]
    assert (
        f"interrupted by SIGINT after checkpoint-{last}; continue with the same command plus resume=true"
        in log.read_text()
    )
    assert logged_steps(run)[-1] == last < STEPS

    train(load_recipe(str(recipe), [f"output_dir={run}", "resume=true"]))
    assert_same_adapter(run, reference / "adapter")
    assert [m["step"] for m in read_metrics(run)] == list(range(1, STEPS + 1))
    assert not list(run.glob(".checkpoint-*"))


# --- disks ------------------------------------------------------------------------------------


def test_full_disk_at_checkpoint_keeps_the_previous_one_and_resume_completes(tmp_path, tiny_model_dir, reference):
    recipe = small_recipe(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-2", run / "checkpoint-2")
    adapter_bytes = (run / "checkpoint-2" / "adapter" / "adapter.safetensors").stat().st_size
    optimizer_bytes = (run / "checkpoint-2" / "optimizer.pt").stat().st_size
    limit = (adapter_bytes + optimizer_bytes) // 2  # the adapter file fits, the optimizer state does not

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*SHARELORA, "train", str(recipe), f"output_dir={run}", "resume=true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files_only,
    )
    # Progress bars share stderr; the error itself is the one line after them, and nothing else failed loudly.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
    too_large = f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}"
    assert f"could not write {run / 'checkpoint-3'}: {too_large}; checkpoint-2 is intact" in errors[0]
    assert assert_checkpoints_complete(run) == [2]
    for name in CHECKPOINT_FILES:
        assert (run / "checkpoint-2" / name).read_bytes() == (reference / "checkpoint-2" / name).read_bytes(), name
    assert not list(run.glob(".checkpoint-*")) and not (run / "adapter").exists()

    train(load_recipe(str(recipe), [f"output_dir={run}", "resume=true"]))
    assert_same_adapter(run, reference / "adapter")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, whose every write fails with ENOSPC")
def test_full_disk_between_checkpoints_stops_at_the_metrics_log_with_one_line(tmp_path, tiny_model_dir, reference):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-2", run / "checkpoint-2")
    (run / "metrics.jsonl").symlink_to("/dev/full")  # the log is appended every step, so a full disk shows there first
    recipe = load_recipe(str(small_recipe(tmp_path, tiny_model_dir)), [f"output_dir={run}", "resume=true"])
    with pytest.raises(UserError) as caught:
        train(recipe)
    assert str(caught.value) == (
        f"could not write {run / 'metrics.jsonl'}: No space left on device; checkpoint-2 is intact. "
        "Free space, then resume with resume=true"
    )
    assert assert_checkpoints_complete(run) == [2]


@pytest.mark.parametrize("blocker", ["regular file", "read-only directory"])
def test_unwritable_output_dir_is_reported_before_training(tmp_path, tiny_model_dir, blocker):
    parent = tmp_path / "blocked"
    if blocker == "regular file":
        parent.write_text("not a directory")
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits; the regular-file case covers root")
        parent.mkdir(mode=0o500)
    run = parent / "run"
    recipe = load_recipe(str(small_recipe(tmp_path, tiny_model_dir)), [f"output_dir={run}"])
    with pytest.raises(UserError) as caught:
        train(recipe)
    assert str(caught.value).startswith(f"output_dir {run} is not writable") and "\n" not in str(caught.value)


# --- non-finite losses ------------------------------------------------------------------------


def diverging_recipe(tmp_path: Path, model_dir: Path, on_nonfinite: str) -> Recipe:
    """lr=1e30: step 1 is finite, step 2's backward overflows."""
    path = small_recipe(tmp_path, model_dir, lr=1e30, scheduler="constant", warmup_steps=0, max_steps=4)
    return load_recipe(str(path), [f"train.on_nonfinite={on_nonfinite}", f"output_dir={tmp_path / on_nonfinite}"])


def test_nonfinite_step_stops_naming_step_and_rows_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    recipe = diverging_recipe(tmp_path, tiny_model_dir, "stop")
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    examples = build_splits(recipe.data, tokenizer, recipe.train.seed).train
    sampler = StepSampler(len(examples), recipe.train.batch_size, 1, 1, 0, recipe.train.seed)
    rows = [examples[i].row + 1 for i in sampler.micro_batches(1)[0]]  # numbered from 1, as a file's lines

    with pytest.raises(UserError) as caught:
        train(recipe)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("non-finite")
    assert f"at step 2 (batch of data rows {rows})" in message and "the last checkpoint is kept" in message
    run = Path(recipe.output_dir)
    assert assert_checkpoints_complete(run) == [1]
    assert all(t.isfinite().all() for t in load_file(run / "checkpoint-1" / "adapter" / "adapter.safetensors").values())
    assert not (run / "adapter").exists()


def test_nonfinite_steps_are_skipped_and_reported_when_asked(tmp_path, tiny_model_dir, capsys):
    recipe = diverging_recipe(tmp_path, tiny_model_dir, "skip")
    summary = train(recipe)
    assert summary.steps == 4
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: non-finite")]
    assert [re.search(r"at step (\d+)", line).group(1) for line in warnings] == ["2", "3", "4"]
    assert all("step skipped" in line for line in warnings)
    # A skipped step changes nothing, so the final adapter is still the one after step 1.
    run = Path(recipe.output_dir)
    final = load_file(run / "adapter" / "adapter.safetensors")
    after_step_1 = load_file(run / "checkpoint-1" / "adapter" / "adapter.safetensors")
    assert all(torch.equal(final[name], after_step_1[name]) and final[name].isfinite().all() for name in final)
    # Every step is logged, skipped ones too, as strict JSON (no bare NaN or Infinity).
    logged = [json.loads(line, parse_constant=pytest.fail) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]


# --- corrupt checkpoints ----------------------------------------------------------------------


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * 8}[how])


@pytest.mark.parametrize(
    "name, how",
    [
        ("optimizer.pt", "truncated"),
        ("scheduler.pt", "garbage"),
        ("rng.pt", "empty"),
        ("trainer_state.json", "truncated"),
        ("adapter/adapter.safetensors", "truncated"),
        ("adapter/sharelora_config.json", "garbage"),
    ],
)
def test_corrupt_checkpoint_file_is_named_and_nothing_runs(tmp_path, tiny_model_dir, reference, name, how):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-3", run / "checkpoint-3")
    corrupt(run / "checkpoint-3" / name, how)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    recipe = load_recipe(str(small_recipe(tmp_path, tiny_model_dir)), [f"output_dir={run}", "resume=true"])
    with pytest.raises(UserError) as caught:
        train(recipe)
    assert str(run / "checkpoint-3" / name) in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.name != "recipe.yaml") == before


def test_checkpoint_with_corrupt_optimizer_state_loads_nothing(tmp_path, tiny_model, reference):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(reference / "checkpoint-3", checkpoint)
    corrupt(checkpoint / "optimizer.pt", "truncated")
    recipe = load_recipe(str(reference.parent / "recipe.yaml"))
    adapter = inject_adapter(tiny_model, recipe.adapter, plan=checkpoint_plan(checkpoint, recipe.adapter))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=recipe.train.lr)
    scheduler = make_scheduler("cosine", optimizer, 1, STEPS)
    before = {name: t.detach().clone() for name, t in adapter.named_tensors().items()}
    with pytest.raises(UserError, match="optimizer.pt"):
        load_checkpoint(checkpoint, adapter, optimizer, scheduler, rank=0, processes=1)
    assert all(torch.equal(t, before[name]) for name, t in adapter.named_tensors().items())
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0
