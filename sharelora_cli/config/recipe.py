"""Recipes: YAML (OmegaConf) + key=value overrides, validated against one typed schema.

The schema below is the single source of defaults. Every validation failure becomes a
UserError whose message names the key and what is allowed.
"""

from difflib import get_close_matches
from pathlib import Path
from typing import Literal, cast, get_args

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from yaml import YAMLError

from sharelora_cli.config.recipe_yaml import load_yaml, override_value
from sharelora_cli.core.errors import UserError, first_line
from sharelora_cli.core.paths import RECIPES_DIR, data_dir

# The adapter methods by name; adapters/registry.py maps each to its implementation.
METHOD_NAMES = (
    "lora",
    "sharea",
    "shareb",
    "shareab",
    "aslora",
    "miss",
    "vera",
    "tied-lora",
    "vblora",
    "lily",
    "unilora",
    "randlora",
    "tinylora",
)
Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]
TaskName = Literal["gsm8k", "mmlu", "humaneval", "perplexity"]
# Accelerate's experiment trackers; each needs its own package.
Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]
DEFAULT_TRACKERS: tuple[Tracker, ...] = ("tensorboard",)
DEFAULT_TASKS: tuple[TaskName, ...] = ("gsm8k", "mmlu")
DataFormat = Literal["gsm8k", "alpaca", "chat", "text"]
PackingMode = Literal["best_fit", "stream"]
# What `data.packing: true` means: instruction data (a prompt, then its answer) is packed whole, so no block
# starts an answer without its prompt; plain text has no such boundary and is cut as one stream.
PACKING_DEFAULT: dict[str, PackingMode] = {
    "gsm8k": "best_fit",
    "alpaca": "best_fit",
    "chat": "best_fit",
    "text": "stream",
}
TiedFactor = Literal["A", "B", "u", "v"]
TIED_FACTORS: tuple[TiedFactor, ...] = ("A", "B", "u", "v")


class Section(BaseModel):
    # No setting has a use for inf or nan, and `lr: .inf` would otherwise pass the gt=0 checks.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelConfig(Section):
    # Required in a recipe file (load_recipe refuses it empty): a forgotten model must not train some other one.
    name_or_path: str = ""
    revision: str | None = None
    # auto: bfloat16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


class QuantizationConfig(Section):
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ASLoRAConfig(Section):
    """Adaptive B merging for method=aslora (see README, 'ASLoRA schedule')."""

    merge_start: float = Field(0.1, ge=0, le=1)
    merge_end: float = Field(0.5, ge=0, le=1)
    merge_every: int = Field(10, gt=0)
    target_groups: int | None = Field(None, gt=0)
    target_ratio: float = Field(0.25, gt=0, le=1)
    similarity: Literal["cosine", "l2"] = "cosine"


class VeRAConfig(Section):
    """method=vera: one frozen random pair A, B for the whole model, regenerated from projection_seed."""

    # Seeds the generator that draws A and B (PEFT's projection_prng_key: the same seed gives PEFT's tensors).
    projection_seed: int = 0
    # Every layer's d vector starts at this constant (b starts at zero); the VeRA paper recommends <= 0.1.
    d_initial: float = Field(0.1, gt=0)


class TiedLoRAConfig(Section):
    """method=tied-lora: which of the tied A, B and the per-layer scaling vectors u, v train; the rest stay frozen."""

    train: list[TiedFactor] = Field(default_factory=lambda: list(TIED_FACTORS), min_length=1)

    @field_validator("train")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a factor twice")
        return value


class VBLoRAConfig(Section):
    """method=vblora: the shared vector bank (PEFT's defaults) and the top-k mixture that reads it."""

    num_vectors: int = Field(256, gt=0)
    # Must divide the d_in and d_out of every adapted layer.
    vector_length: int = Field(256, gt=0)
    topk: int = Field(2, gt=0)
    init_vector_bank_bound: float = Field(0.02, gt=0)
    init_logits_std: float = Field(0.1, gt=0)

    @field_validator("topk")
    @classmethod
    def _at_most_num_vectors(cls, value: int, info: ValidationInfo) -> int:
        if value > info.data.get("num_vectors", value):
            raise ValueError(f"must be at most num_vectors ({info.data['num_vectors']})")
        return value


class LilyConfig(Section):
    """method=lily: A shared by stride_A adjacent layers, num_B B experts per module type (PEFT's names and defaults)."""

    stride_A: int = Field(1, ge=1)
    # The router learns to weigh the experts only when there are at least two (PEFT refuses fewer too).
    num_B: int = Field(2, ge=2)
    # A plain multiplier of the adapter's output (Lily has no alpha/r).
    scaling: float = Field(1.0, gt=0)


class UniLoRAConfig(Section):
    """method=unilora: the one trainable vector every LoRA entry reads (PEFT's UniLoraConfig defaults)."""

    # PEFT's theta_d_length: the number of trainable parameters, whatever the model and rank. At most 2^24:
    # the regenerated assignment holds indices as float32, exact up to there.
    vector_length: int = Field(256, gt=0, le=2**24)
    # Seeds the fixed assignment of LoRA entries to the vector's indices (PEFT's proj_seed: the same seed
    # gives PEFT's own assignment).
    projection_seed: int = 42
    # The vector starts U(-init_bound, init_bound) (PEFT's init_theta_d_bound).
    init_bound: float = Field(0.02, gt=0)


class RandLoRAConfig(Section):
    """method=randlora: the frozen random bases (basis rank = adapter.rank), regenerated from projection_seed."""

    # Seeds the generator that draws the bases (PEFT's projection_prng_key: the same seed gives PEFT's tensors).
    projection_seed: int = 0


class TinyLoRAConfig(Section):
    """method=tinylora: the trained vector's length u, how far it is tied across modules, the seed of the P's (PEFT's defaults)."""

    u: int = Field(64, gt=0)
    # 0: one v per adapted module; 1: one v for the whole model; between: runs of consecutive modules share one.
    weight_tying: float = Field(0.0, ge=0, le=1)
    # Layer k's fixed random matrices P come from a generator seeded with projection_seed + k (PEFT's rule).
    projection_seed: int = 42


class AdapterConfig(Section):
    method: Method = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    # When set, a module is adapted if its full dotted name matches this regex (targets ignored).
    target_regex: str | None = None
    # Scale by alpha/sqrt(rank) instead of alpha/rank.
    rslora: bool = False
    aslora: ASLoRAConfig = Field(default_factory=ASLoRAConfig)
    vera: VeRAConfig = Field(default_factory=VeRAConfig)
    tied_lora: TiedLoRAConfig = Field(default_factory=TiedLoRAConfig)
    vblora: VBLoRAConfig = Field(default_factory=VBLoRAConfig)
    lily: LilyConfig = Field(default_factory=LilyConfig)
    unilora: UniLoRAConfig = Field(default_factory=UniLoRAConfig)
    randlora: RandLoRAConfig = Field(default_factory=RandLoRAConfig)
    tinylora: TinyLoRAConfig = Field(default_factory=TinyLoRAConfig)
    # A saved sharelora adapter to start from instead of a fresh one: OUTPUT_DIR/adapter or a checkpoint-N
    # directory. Its method, rank, alpha and targets must be these.
    init_from: str | None = None
    # Also continue the optimizer's state saved beside it (init_from must then be a checkpoint-N directory).
    init_optimizer: bool = False


class DataConfig(Section):
    # Local json/jsonl/csv/parquet file, or a hub dataset id.
    path: str = "${data:gsm8k/train.jsonl}"
    format: DataFormat = "gsm8k"
    split: str = "train"
    # A hub dataset's configuration (e.g. main for openai/gsm8k); None for local files and single-config datasets.
    subset: str | None = None
    max_length: int = Field(512, gt=0)
    # What to do with an example longer than max_length.
    overlength: Literal["error", "truncate", "drop"] = "error"
    mask_prompt: bool = True
    # best_fit: whole examples placed into max_length blocks; stream: the examples' concatenation cut every
    # max_length tokens (an example may straddle two blocks); true: the format's PACKING_DEFAULT; false: none.
    packing: Literal[True, False, "best_fit", "stream"] = False
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    max_examples: int | None = Field(None, gt=0)

    def packing_mode(self) -> PackingMode | None:
        """How examples are packed (None: not at all), `packing: true` resolved for the format."""
        if self.packing is True:
            return PACKING_DEFAULT[self.format]
        return self.packing or None


class DistributedConfig(Section):
    """How a run spreads over the processes its launch starts (docs/distributed.md)."""

    # auto: FSDP2 when the launch asks for FSDP (accelerate launch --use_fsdp), DDP with several processes.
    # fsdp2: shard each decoder layer (and the adapter, owned by the root) over the processes, on CPU or GPU.
    strategy: Literal["auto", "ddp", "fsdp2"] = "auto"
    # FSDP2: free a decoder layer's gathered weights after its forward and gather them again for backward.
    reshard_after_forward: bool = True


class TrainConfig(Section):
    max_steps: int = Field(100, gt=0)
    # Instead of max_steps: this many passes over the training examples (blocks when packed), rounded up to
    # whole steps; the data summary line before training says how many steps that is.
    num_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    # auto: bf16 on CUDA, none on CPU.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # torch.compile the model (through Accelerate); the adapters then run as plain operators for inductor to fuse.
    compile: bool = False
    # With compile, on CUDA: capture CUDA graphs of the compiled regions (torch.compile's "reduce-overhead" mode).
    cuda_graphs: bool = False
    # On CUDA: Liger's Triton kernels for RMSNorm, RoPE, SwiGLU and a fused linear cross-entropy that never
    # builds the logits tensor (needs the liger-kernel package: pip install 'sharelora[gpu]').
    liger_kernel: bool = False
    seed: int = 42
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(50, gt=0)
    eval_batches: int = Field(8, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Evaluations run beside val_loss every eval_every steps (main process), with the eval section's settings.
    eval_tasks: list[TaskName] = Field(default_factory=list)
    # Where metrics go besides metrics.jsonl: Accelerate's trackers (an empty list: none).
    report_to: list[Tracker] = Field(default_factory=lambda: list(DEFAULT_TRACKERS))
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


class GSM8KTaskConfig(Section):
    # A folder holding train.jsonl and test.jsonl, or a hub dataset id (config "main", e.g. openai/gsm8k).
    path: str = "${data:gsm8k}"
    # Worked solutions from the start of the train split, "Question: ...\nAnswer: ..." like lm-eval's gsm8k.
    num_fewshot: int = Field(8, ge=0)
    max_new_tokens: int = Field(256, gt=0)


class MMLUTaskConfig(Section):
    # A folder holding dev/<subject>_dev.csv and test/<subject>_test.csv, or a hub dataset id (cais/mmlu).
    path: str = "${data:mmlu}"
    num_fewshot: int = Field(5, ge=0, le=5)
    # None: all 57 subjects.
    subjects: list[str] | None = None


class HumanEvalTaskConfig(Section):
    path: str = "${data:humaneval/HumanEval.jsonl.gz}"
    # 1: one greedy completion per problem; more: sampled with temperature/top_p, for pass@k.
    num_samples: int = Field(1, gt=0)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    ks: list[int] = Field(default_factory=lambda: [1, 10, 100])
    max_new_tokens: int = Field(512, gt=0)
    timeout: float = Field(3.0, gt=0)
    workers: int = Field(2, gt=0)


class PerplexityTaskConfig(Section):
    # A .txt/.json/.jsonl/.csv/.parquet file or a hub dataset id; required when the task runs.
    path: str | None = None
    split: str = "test"
    field: str = "text"
    # Tokens a window advances; None: max_length (non-overlapping chunks). Smaller gives each token more context.
    stride: int | None = Field(None, gt=0)


class EvalConfig(Section):
    """`sharelora eval`: which benchmarks, on how many examples, with what batching."""

    tasks: list[TaskName] = Field(default_factory=lambda: list(DEFAULT_TASKS))
    # First N examples per task (per subject for MMLU); None: all.
    limit: int | None = Field(None, gt=0)
    # auto: the largest that fits on CUDA (halved on out-of-memory), 8 on CPU.
    batch_size: int | Literal["auto"] = "auto"
    # Context window in tokens; None: the model config's max_position_embeddings.
    max_length: int | None = Field(None, gt=0)
    # Adapter directory; None: OUTPUT_DIR/adapter when a recipe is evaluated, no adapter otherwise.
    adapter: str | None = None
    # None: named by what was evaluated (README, Evaluation): eval.json with an adapter, eval-base.json without,
    # in OUTPUT_DIR (or the folder holding --adapter); eval-<model>.json for a bare --model.
    results_file: str | None = None
    # harness: lm-evaluation-harness's prompts ("Question: ...\nAnswer:"); train: GSM8K questions in the prompt
    # format the adapter was trained on (its data.format: alpaca, chat or gsm8k), shots as earlier turns.
    prompt_format: Literal["harness", "train"] = "harness"
    seed: int = 1234
    gsm8k: GSM8KTaskConfig = Field(default_factory=GSM8KTaskConfig)
    mmlu: MMLUTaskConfig = Field(default_factory=MMLUTaskConfig)
    humaneval: HumanEvalTaskConfig = Field(default_factory=HumanEvalTaskConfig)
    perplexity: PerplexityTaskConfig = Field(default_factory=PerplexityTaskConfig)

    @field_validator("batch_size")
    @classmethod
    def _positive_batch_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be auto or a positive integer")
        return value


class StageConfig(Section):
    """One stage of a continual run: what it changes in the recipe's data, train and eval sections.

    Only the keys a stage sets override the recipe's; the rest are the recipe's own (not the previous stage's).
    """

    # Names the stage's evaluation in the continual matrix; None: stage-K.
    name: str | None = None
    data: DataConfig | None = None
    train: TrainConfig | None = None
    eval: EvalConfig | None = None


STAGE_SECTIONS = ("data", "train", "eval")


class Recipe(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # Continual fine-tuning: stages trained in order, each continuing the previous stage's adapter.
    stages: list[StageConfig] = Field(default_factory=list)
    # Empty in a recipe file: runs/<recipe name> (load_recipe), so every recipe gets its own folder and every
    # process the same one.
    output_dir: str = ""
    resume: bool = False

    @field_serializer("stages")
    def _stages_as_written(self, stages: list[StageConfig]) -> list[dict]:
        # A stage's unset keys inherit the recipe's; dumping their defaults would turn them into overrides.
        return [stage.model_dump(exclude_unset=True) for stage in stages]

    @model_validator(mode="after")
    def _stages_are_named_apart_and_scored(self) -> "Recipe":
        names = [stage_name(self, k) for k in range(len(self.stages))]
        if len(set(names)) < len(names):
            raise ValueError(
                f"stages: two stages are named {next(n for n in names if names.count(n) > 1)!r}; names must differ"
            )
        for k in range(len(self.stages)):
            if "perplexity" in stage_recipe(self, k).eval.tasks:
                raise ValueError(
                    f"stages[{k}]: eval.tasks has perplexity, which is no accuracy; a continual run "
                    "scores gsm8k, mmlu and humaneval"
                )
        return self


def stage_recipe(recipe: Recipe, index: int) -> Recipe:
    """The recipe stage `index` (0-based) trains with: the recipe's sections with the stage's keys over them."""
    stage = recipe.stages[index].model_dump(exclude_unset=True)
    values = recipe.model_dump()
    for section in STAGE_SECTIONS:
        if stage.get(section):
            values[section] = OmegaConf.to_container(OmegaConf.merge(values[section], stage[section]))
    return Recipe.model_validate({**values, "stages": []})


def stage_name(recipe: Recipe, index: int) -> str:
    return recipe.stages[index].name or f"stage-{index + 1}"


def _data_resolver(relative: str = "") -> str:
    return str(data_dir() / relative)


if not OmegaConf.has_resolver("data"):
    getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)("data", _data_resolver)


def find_recipe(name: str) -> Path:
    """A recipe path, or the name of a shipped recipe (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"recipe '{name}' not found: give a YAML path or one of: {', '.join(shipped_recipes())}")


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


# What OmegaConf and PyYAML raise besides their own errors: OSError for a scalar document, ValueError
# for an integer over Python's 4300-digit limit, TypeError for a list merged over a mapping (or the
# reverse), RecursionError for very deep nesting.
LOADER_ERRORS = (OSError, ValueError, TypeError, RecursionError)


def load_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file, apply key=value overrides, resolve interpolations and validate."""
    path = find_recipe(name)
    base = OmegaConf.structured(Recipe().model_dump())
    from_overrides = _parse_overrides(overrides or [])
    try:
        document = load_yaml(path.read_text(encoding="utf-8"), Recipe)
        if document is not None and not isinstance(document, dict):
            raise UserError(
                f"recipe {path}: expected a mapping of sections (model:, adapter:, ...), "
                f"got a {'list' if isinstance(document, list) else 'scalar'}"
            )
        from_file = OmegaConf.create(document or {})
        plain = OmegaConf.to_container(OmegaConf.merge(base, from_file, from_overrides), resolve=True)
    except YAMLError as err:
        raise UserError(f"recipe {path}: invalid YAML: {_yaml_message(err)}") from None
    except OmegaConfBaseException as err:
        raise UserError(f"recipe {path}: {_omegaconf_message(err)}") from None
    except LOADER_ERRORS as err:
        raise UserError(
            f"recipe {path}: cannot use it ({type(err).__name__}: {first_line(err)}); "
            "a recipe is a YAML mapping of sections (model:, adapter:, ...)"
        ) from None
    return with_required(validate(plain, source=str(path)), path)


def with_required(recipe: Recipe, path: Path) -> Recipe:
    """The recipe with output_dir defaulted to runs/<recipe name>; a recipe without a model is refused."""
    if not recipe.model.name_or_path:
        raise UserError(
            f"recipe {path}: model.name_or_path is required (a model directory, a recipes/models name or a hub id); "
            "add `model: {name_or_path: ...}` to the recipe or pass model.name_or_path=..."
        )
    return recipe if recipe.output_dir else recipe.model_copy(update={"output_dir": f"runs/{path.stem}"})


def defaults_with(overrides: list[str], recorded: dict | None = None) -> dict:
    """The schema's defaults, under `recorded` values (e.g. what an adapter was trained with), under key=value
    overrides, resolved: the settings of a command run without a recipe."""
    from_overrides = _parse_overrides(overrides)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe().model_dump()), recorded or {}, from_overrides)
        return cast(dict, OmegaConf.to_container(merged, resolve=True))
    except OmegaConfBaseException as err:
        raise UserError(f"overrides: {_omegaconf_message(err)}") from None
    except LOADER_ERRORS as err:
        raise UserError(f"overrides: cannot use them ({type(err).__name__}: {first_line(err)})") from None


def validate(values: object, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(values)
    except ValidationError as err:
        raise UserError(f"{source}: {_describe(err.errors()[0])}") from None


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(recipe.model_dump()))


def _parse_overrides(overrides: list[str]):
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} must look like key=value, e.g. adapter.rank=16")
        _check_override_key(item, key.strip())
    conf = OmegaConf.create()
    try:
        for item in overrides:
            key, _, text = item.partition("=")
            OmegaConf.update(conf, key, override_value(key, text, Recipe))
    except YAMLError as err:
        raise UserError(f"overrides: invalid YAML value: {_yaml_message(err)}") from None
    except OmegaConfBaseException as err:
        raise UserError(f"overrides: {_omegaconf_message(err)}") from None
    except LOADER_ERRORS as err:
        raise UserError(f"overrides: cannot use them ({type(err).__name__}: {first_line(err)})") from None
    return conf


def _check_override_key(item: str, key: str) -> None:
    """A key the schema does not have is the override's mistake, not the recipe file's: say so, with the near miss."""
    model: type[BaseModel] = Recipe
    parts = [part.partition("[")[0] for part in key.split(".")]  # stages[0] -> stages
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            unknown = ".".join(parts[: depth + 1])
            raise UserError(f"override {item!r}: unknown key {unknown!r}{_did_you_mean(unknown, model)}")
        nested = _section_of(model.model_fields[part].annotation)
        if nested is None:
            return  # a value (or a list, such as stages[...]): OmegaConf and the schema check the rest
        model = nested


def _section_of(annotation: object) -> type[BaseModel] | None:
    """The section class a field holds (also through `X | None`), or None for a plain value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _did_you_mean(key: str, model: type[BaseModel]) -> str:
    """The nearest key of the section (difflib), and the section's keys; key is dotted, its section `model`."""
    section, _, name = key.rpartition(".")
    close = get_close_matches(name, list(model.model_fields), n=1)
    allowed = ", ".join(model.model_fields)
    if not close:
        return f"; allowed keys here: {allowed}"
    return f"; did you mean {'.'.join(filter(None, (section, close[0])))!r}? (allowed keys here: {allowed})"


def _yaml_message(err: YAMLError) -> str:
    """The problem and where it is; PyYAML's own text spans several lines."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return first_line(err)


def _section_model(loc: tuple) -> type[BaseModel]:
    """The schema class that owns the last key of loc."""
    model: type[BaseModel] = Recipe
    for key in loc[:-1]:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model


def _describe(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "recipe"
    got = error.get("input")
    if error["type"] == "value_error" and not loc:  # a check of the whole recipe, whose message names the keys
        return str(error["ctx"]["error"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}{_did_you_mean(key, _section_model(loc))}"
    if error["type"] == "literal_error":
        # Literal members as YAML spells them (data.packing's True and False are true and false there).
        allowed = error["ctx"]["expected"].replace("'", "").replace("True", "true").replace("False", "false")
        return f"{key} must be one of {allowed}; got {got!r}"
    return f"{key}: {error['msg'].lower()}; got {got!r}"


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    text = first_line(err)
    if not key:
        return text
    # A key typed by the user may hold control or line-separator characters: quote it then, to stay on one line.
    return f"{key if key.isprintable() else repr(key)}: {text}"
