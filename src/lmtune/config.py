"""One typed run configuration: YAML + dotted overrides -> `RunConfig`, validated strictly.

The attribute docstrings below are the only documentation of each key; `lmtune train --help`
prints them. Method options live in each method's own config class (see `methods/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator
from pydantic.fields import FieldInfo

from lmtune import methods, tasks
from lmtune.errors import LmtuneError
from lmtune.methods import DEFAULT, get_method, method_config_type, method_names
from lmtune.schema import Strict, validate_as

__all__ = ["RunConfig", "Strict", "dump_config", "load_config", "validate"]

MethodSection = method_config_type()
"""Every registered method's config class, told apart by `name`: YAML, overrides, the API, the studio form and
checkpoints all read and write the method section as part of RunConfig."""


class ModelConfig(Strict):
    name: str | None = None
    """Local transformers directory, GGUF file, or hub id; empty means the packaged SmolLM2-135M-Instruct."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the base weights are loaded in."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its author."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Store the frozen base weights in 8-bit (LLM.int8) or 4-bit (QLoRA) through bitsandbytes; only
    methods that leave the base weights frozen can train on top."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NF4 (QLoRA's normal-float) or plain FP4."""
    double_quant: bool = False
    """4-bit only: quantize the quantization constants too (QLoRA's double quantization, ~0.4 bit/param less)."""


class DataSource(Strict):
    path: str
    """A data file (.jsonl, .json, .csv, .parquet, .txt) or, online, a hub dataset id."""
    weight: float = Field(1.0, gt=0, le=1000)
    """How many times each of its examples is used per epoch: 2 repeats them, 0.5 draws half of them (at most
    1000)."""


class PreserveConfig(Strict):
    prompts: str | None = None
    """Forgetting guard: `general` (lmtune's ~200 varied general prompts) or your file (.txt, a prompt a line; or
    records with `prompt`). The base model's own greedy answers to them (made once, cached) are mixed into the
    training data; a held-out part reports retention in the log and summary. Empty: off. `data.preserve=general`."""
    fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Share of the mixed training set that is base-model answers."""
    held_out: int = Field(32, ge=0)
    """Prompts kept out of training that measure retention (agreement with the base answers, their loss)."""
    kl: float = Field(1.0, ge=0)
    """Weight of a KL(base || tuned) term on the mixed answers' tokens, per token like the loss: the whole base
    distribution is kept there, not only its greedy token. The base is the model with the method switched off
    (a frozen copy for full / freeze, not in the memory estimate). 0: the answers alone."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest base answer generated; one cut by this limit is trimmed to its last full sentence."""


class DataConfig(Strict):
    train: list[DataSource] = Field(min_length=1)
    """Training data: a file, or a list of files / {path, weight} mappings mixed together. Records are detected
    by keys: messages; prompt+completion; instruction+output (Alpaca); text+label (classification); text
    (pretrain; .txt files too); prompt+chosen+rejected (dpo / simpo)."""
    eval: list[DataSource] | None = None
    """Evaluation data in the same form; when empty, `eval_split` of each training source is held out."""
    eval_split: float = Field(0.0, ge=0, lt=1)
    """Fraction of the training records held out for evaluation when no `eval` file is given."""
    max_length: int = Field(1024, ge=2)
    """Tokens per example (per block for pretrain, per row with packing); longer examples are cut from the
    right and counted. At most the model's position limit (the memory estimate never assumes more)."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompt/completion records become text: the tokenizer's chat template (`chat`), plain
    concatenation (`plain`), or `auto` (chat when the tokenizer has a template)."""

    packing: bool = False
    """Put several examples in each row (sft, pretrain) with no attention between them: fewer pad tokens."""
    skip_bad_records: bool = False
    """Skip records that cannot be read or rendered (counted and reported) instead of stopping at the first."""
    chat_template: str | None = None
    """A Jinja file that replaces the tokenizer's chat template (rendered sandboxed; saved with the result)."""
    assistant_turns: Literal["all", "last"] = "all"
    """Which assistant turns of a conversation carry loss: every one, or only the last."""
    prompt_template: str = "{text}\nLabel:"
    """How a classification record (text + label) becomes a prompt; `{field}` names any field of the record.
    The label is the completion."""
    cache: bool = True
    """Keep tokenised data in the cache directory, so a second run with the same data and tokenizer starts at once."""
    preserve: PreserveConfig = PreserveConfig()
    """The forgetting guard (see data.preserve.prompts); `preserve: general` in YAML is short for prompts: general."""

    @field_validator("preserve", mode="before")
    @classmethod
    def _preserve_shorthand(cls, v: Any) -> Any:
        if v is None or v is False:
            return {}
        return {"prompts": "general" if v is True else v} if isinstance(v, (str, bool)) else v

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        if v is None:
            return v
        items = v if isinstance(v, list) else [v]
        return [{"path": item} if isinstance(item, str) else item for item in items]



class TrainConfig(Strict):
    steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; when empty, `epochs` passes over the training data."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data when `steps` is empty."""
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch (pairs for dpo / simpo / reward; prompts for grpo, each sampled grpo.group_size
    times; rows of data.max_length with data.packing)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is normalised by the step's label tokens."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warm-up from 0 to `lr`."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; empty disables clipping."""
    seed: int = Field(42, ge=0, lt=2**32)
    """Seed for initialisation, shuffling and dropout."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every N steps (and always at the end) when there is eval data."""
    log_every: int = Field(1, ge=1)
    """Write a metrics line every N steps."""
    device: Literal["auto", "cpu"] = "auto"
    """`auto` uses the accelerator accelerate finds, `cpu` forces the CPU."""
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16"] = "auto"
    """`auto`: bf16 where the device multiplies bf16 natively (CUDA compute capability 8+, a CPU with AMX or
    AVX512-BF16), else fp32; the run log says what it chose and why. `fp32`; `bf16-mixed` / `fp16-mixed`: fp32
    master weights, matmuls autocast to 16 bits (fp16 needs a GPU); `bf16`: base weights in bf16 (a method's own
    parameters stay fp32; full / freeze train bf16 weights). The loss is always computed in fp32."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: much less memory, ~30% more compute."""
    save_every: int | None = Field(500, ge=1)
    """Write a resumable checkpoint (weights, optimizer, scheduler, RNG, step) every N steps and at the end;
    empty: only at the end."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the latest resumable checkpoints to keep in `output_dir/checkpoints`."""
    tensorboard: bool = False
    """Also log every metrics row to TensorBoard, in `output_dir/tensorboard` (needs `pip install tensorboard`)."""


class PreferenceConfig(Strict):
    beta: float | None = Field(None, gt=0)
    """Strength of the preference: the scale of the log-probability margin (default 0.1 for dpo, 2.0 for simpo);
    for orpo the weight of the odds-ratio term (default 0.1), for kto the scale of its rewards (default 0.1)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Probability that a pair's preference is flipped (conservative DPO); 0 trusts every label."""
    gamma: float = Field(0.5, ge=0)
    """SimPO's target margin between the chosen and rejected rewards."""
    margin: float = Field(0.0, ge=0)
    """Task reward: how far the chosen score must beat the rejected one (-log sigmoid(r_c - r_r - margin))."""



class GrpoConfig(Strict):
    """GRPO (Shao et al. 2024): per prompt, a group of sampled completions, scored, advantages normalised in
    the group, a clipped policy ratio and a KL penalty to the reference (the base model)."""

    group_size: int = Field(4, ge=2)
    """Completions sampled per prompt; their rewards are normalised within the group (at least 2)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the completions (log-probabilities are taken at the same temperature)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest completion, in tokens."""
    beta: float = Field(0.04, ge=0)
    """Weight of the per-token KL penalty to the reference (k3 estimator); 0 drops the reference pass."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """Clip range of the policy ratio: [1 - epsilon, 1 + epsilon]."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer steps taken on each batch of completions (mu); above 1 the ratio to the sampling policy is clipped."""
    loss_type: Literal["dapo", "grpo"] = "dapo"
    """How token losses are averaged: `dapo` over every completion token of the step (TRL's default), `grpo`
    per completion first, then over completions."""
    scale_rewards: bool = True
    """Divide the advantages by the group's standard deviation (false: Dr. GRPO's unscaled advantages)."""
    reward: list[str] = []
    """Reward functions as `module:function` (e.g. lmtune.rewards:answer_format), summed. Each is called with
    prompts=, completions= (lists of strings) and every other field of the data rows (lists), and returns one
    float per completion."""
    reward_model: str | None = None
    """A run directory from `task: reward` whose score is (added to) the reward."""

    @field_validator("reward", mode="before")
    @classmethod
    def _reward_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v



class RunConfig(Strict):
    data: DataConfig
    """Where the examples come from and how they are tokenised."""
    model: ModelConfig = ModelConfig()
    """The base model."""
    method: MethodSection = Field(DEFAULT, validate_default=True)  # the default becomes a config object too
    """Fine-tuning method: its name, or a mapping with `name` and the method's options (listed below)."""
    task: str = Field("sft", json_schema_extra=lambda schema: schema.update(enum=tasks.task_names()))
    """Objective, one of the registered tasks: `sft` (loss on completions / assistant turns), `pretrain`,
    `dpo`, `simpo`, `orpo`, `kto`, `reward`, `grpo` (`lmtune train --help` ends with what each trains on)."""
    preference: PreferenceConfig = PreferenceConfig()
    """Options of the preference tasks (dpo, simpo, orpo, kto, reward)."""
    grpo: GrpoConfig = GrpoConfig()
    """Options of task grpo."""
    train: TrainConfig = TrainConfig()
    """Optimisation settings."""
    output_dir: str = Field("runs/latest", min_length=1)
    """Where the result, metrics and plots are written."""
    overwrite: bool = False
    """Replace a finished run in `output_dir` instead of refusing (with `resume: never`, also an unfinished one)."""
    resume: str = Field("auto", min_length=1)
    """`auto`: continue from the latest checkpoint in `output_dir` when its run did not finish; `never`:
    start over; or a checkpoint directory (`RUN/checkpoints/step-N`, or a run directory for its latest)."""
    force: bool = False
    """Train even when the memory estimate (`lmtune estimate`) exceeds the memory available on the device."""

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) or v is None else v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in tasks.task_names():
            names = [repr(n) for n in tasks.task_names()]
            raise ValueError(f"Input should be {', '.join(names[:-1])} or {names[-1]}")  # as for any closed choice
        return v


def _follow_method_registry() -> None:
    """A method registered after this module was loaded (a plugin's, a test's) joins RunConfig's method union."""
    old = RunConfig.model_fields["method"]
    RunConfig.__pydantic_fields__["method"] = FieldInfo.from_annotated_attribute(
        method_config_type(), Field(old.default, validate_default=True, description=old.description))
    RunConfig.model_rebuild(force=True)


methods.on_register(_follow_method_registry)


def validate(raw: dict[str, Any], prefix: str = "", cls: type[BaseModel] | None = None) -> Any:
    """Validate a mapping against `cls` (default RunConfig), raising LmtuneError with one line."""
    return validate_as(cls or RunConfig, raw, prefix)


NAMED_SECTIONS = ("model", "method")  # sections a YAML may give as just their name: `method: lora`


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise LmtuneError(f"override '{assignment}' is not key=value (e.g. train.lr=1e-4)")
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and depth == 0 and part in NAMED_SECTIONS:  # `method: lora` + `method.r=16`
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise LmtuneError(f"override '{key}': '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = parse_yaml(value) if value else None
    except yaml.YAMLError as err:
        raise LmtuneError(f"override '{assignment}': the value is not valid YAML ({_problem(err)}); quote it, "
                          "e.g. key='[x'") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not a silent last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if line != key_node.start_mark.line and key != "<<":
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first on line {line + 1}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _problem(err: yaml.YAMLError) -> str:
    return str(getattr(err, "problem", None) or err).strip()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or none) and apply overrides."""
    return validate(load_raw(path, overrides))


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML mapping (or an empty one) with the overrides applied, not yet validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise LmtuneError(f"{p} is a directory; give the path of a YAML run config")
        if not p.is_file():
            raise LmtuneError(f"config file not found: {p}")
        try:
            raw = parse_yaml(p.read_bytes().decode()) or {}
        except UnicodeDecodeError as err:
            raise LmtuneError(f"{p}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                              "save the file as UTF-8") from None
        except OSError as err:
            raise LmtuneError(f"cannot read {p}: {err.strerror}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise LmtuneError(f"{p}:{where} is not valid YAML ({_problem(err)})") from None
        if not isinstance(raw, dict):
            raise LmtuneError(f"{p}: the top level must be a mapping of keys (model, method, data, train, ...)")
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, saved next to every result."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_keys() -> str:
    """Every config key with its type, default and docstring: the `lmtune train --help` epilog."""
    lines = ["config keys (YAML, or key=value overrides):"]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            if name == "method" or (prefix == "method." and name == "name"):
                continue
            default = "required" if field.is_required() else f"default {field.default!r}"
            lines.append(f"  {prefix}{name} ({default}): {' '.join((field.description or '').split())}")

    walk(RunConfig, "")
    lines.append(f"  method: {' '.join(RunConfig.model_fields['method'].description.split())}")
    lines += [f" task '{name}' (task={name}): {tasks.get_task(name).summary}" for name in tasks.task_names()]
    for name in method_names():
        lines.append(f" method '{name}' options (method.name={name}):")
        before = len(lines)
        walk(get_method(name).config, "method.")
        if len(lines) == before:
            lines.append("  (none)")
    return "\n".join(lines)
