"""The parameter schema: one dataclass per `params.yaml` section, validated at load.

Every stage reads exactly one section (plus nothing else), and `dvc.yaml` declares that section as
the stage's params, so editing a key reruns only the stages downstream of it. All keys are required
in the file: a default hidden in code would be invisible to DVC's parameter tracking, and a run
could change behaviour without DVC noticing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar

import yaml

from offline_opd.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(UserError, ValueError):
    """A parameter file is missing, malformed, or holds a bad value. The message names file and key."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric key, attached as `Annotated[int, Range(ge=1)]`.

    Why in the type and not in each stage: the bound is then checked once, at load, before any
    stage writes anything, and the error names `params.yaml: section.key` like every other
    schema error. `gt`/`lt` are strict bounds, `ge`/`le` inclusive.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def check(self, value: float, where: str) -> None:
        for bound, ok, word in ((self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                                (self.le, lambda b: value <= b, "<="), (self.lt, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise ConfigError(f"{where}: {value!r} is out of range; it must be {word} {bound:g}")


# The bounds most keys need, named once.
Count = Annotated[int, Range(ge=1)]            # sizes, steps, batch sizes: at least 1
NonNegInt = Annotated[int, Range(ge=0)]        # seeds, worker counts
Positive = Annotated[float, Range(gt=0)]       # learning rates, temperatures used as divisors
NonNeg = Annotated[float, Range(ge=0)]         # weights, clip norms, temperatures (0 = greedy)
Fraction = Annotated[float, Range(ge=0, le=1)]  # fractions and probabilities


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """`prepare`: the prompt sets. `kind: addition` generates the embedded toy task."""

    kind: Literal["addition", "file"]
    digits: Count
    n_sft: Count
    n_opd: Count
    n_eval: Count
    seed: NonNegInt
    # For kind=file: a JSONL or Parquet file with columns `prompt` and optionally `prompt_id`,
    # `answer` (reference answer for the verifier) and `split` (sft/opd/eval).
    prompt_file: Optional[str]

    def check(self, where: str) -> None:
        """A prompt file with the toy task would be silently ignored; refuse it."""
        if self.kind == "addition" and self.prompt_file is not None:
            raise ConfigError(f"{where}.prompt_file: set, but task.kind 'addition' ignores it; set "
                              f"task.kind: file to use it, or prompt_file: null")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The keys every training stage (teacher, sft, distill) shares; one trainer builder reads them.

    `batch_size` is sequences per device per micro-batch, so one optimizer step sees
    batch_size x devices x num_nodes x accumulate_grad_batches sequences, and its loss is divided by
    the loss tokens of all of them (pipeline/offline_opd/train/module.py). `precision` bf16-true loads and trains
    the weights in bf16; 32-true and bf16-mixed keep fp32 weights. `strategy: fsdp` is FSDP2: parameters,
    gradients and optimizer state sharded over all ranks, one unit per decoder layer
    (pipeline/offline_opd/train/sharding.py); `cpu_offload` keeps those shards in CPU memory (fsdp only).
    `gradient_checkpointing` recomputes each decoder layer's activations in backward.
    """

    max_steps: Count
    batch_size: Count
    accumulate_grad_batches: Count
    lr: Positive
    warmup_frac: Fraction
    weight_decay: NonNeg
    adam_beta1: Annotated[float, Range(ge=0, lt=1)]
    adam_beta2: Annotated[float, Range(ge=0, lt=1)]
    adam_eps: Positive
    grad_clip: NonNeg                  # max global gradient norm; 0 = no clipping
    precision: Literal["32-true", "bf16-mixed", "bf16-true"]
    strategy: Literal["auto", "ddp", "fsdp"]
    devices: Count
    num_nodes: Count
    gradient_checkpointing: bool
    cpu_offload: bool                  # fsdp: parameter, gradient and AdamW shards in CPU memory
    checkpoint_every_n_steps: Count    # steps between resume checkpoints (<logs>/checkpoints/last.ckpt)
    seed: NonNegInt

    def check(self, where: str) -> None:
        """Offloading moves FSDP's shards; without sharding there is nothing to offload."""
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError(f"{where}.cpu_offload: true needs strategy: fsdp (it offloads FSDP's parameter "
                              f"and optimizer shards); set strategy: fsdp or cpu_offload: false")


@dataclasses.dataclass(frozen=True)
class ModelConfig(TrainConfig):
    """A model to train from scratch (`source: scratch`, with this architecture), an existing Hugging Face
    model path or hub id, or (teacher only) a GGUF file: a path or `package:<python package>/<file>.gguf`."""

    source: str
    hidden_size: Count
    num_layers: Count
    num_heads: Count
    intermediate_size: Count

    def check(self, where: str) -> None:
        """A scratch Llama splits hidden_size into num_heads heads of an even size (rotary embeddings)."""
        super().check(where)
        if self.source == "scratch" and (self.hidden_size % self.num_heads or self.hidden_size // self.num_heads % 2):
            raise ConfigError(f"{where}.num_heads: {self.num_heads} heads do not split hidden_size "
                              f"{self.hidden_size} into heads of an even size; pick num_heads so that "
                              f"hidden_size / num_heads is an even integer")


@dataclasses.dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """`teacher`: trains the toy teacher on reference answers, or resolves and fingerprints a real one."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The keys of every stage that loads a model into a generation/scoring engine (pipeline/offline_opd/backends/).

    Why the dtype is a key: vLLM silently runs an fp32 checkpoint in bf16 unless told, which moved
    top-1 agreement with HF to 97 % on SmolLM2 (docs/design.md §3); `auto` is fp32 on CPU and bf16 on GPU.
    The resolved dtype and max_model_len go into every shard footer the stage writes.
    """

    backend: Literal["hf", "vllm"]
    batch_size: Count
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    max_model_len: Count       # prompt + response tokens per sequence; longer inputs are refused
    kv_cache_gib: Positive     # vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE on CPU); unused by hf


@dataclasses.dataclass(frozen=True)
class GenerationConfig(EngineConfig):
    """Settings shared by every stage that generates text with a model."""

    max_new_tokens: Count
    temperature: NonNeg
    rows_per_shard: Count
    seed: NonNegInt


@dataclasses.dataclass(frozen=True)
class SftDataConfig(GenerationConfig):
    """`sft_data`: the teacher answers the SFT prompts (this ties SFT to the teacher)."""


@dataclasses.dataclass(frozen=True)
class SftConfig(ModelConfig):
    """`sft`: the student base fine-tuned on the teacher's answers.

    `source`: `scratch` (a toy Llama on the teacher's tokenizer), `teacher` (the teacher's own
    weights) or a model folder / hub id. `prune_to_layers`: keep only this many decoder layers of
    a pretrained base (first and last kept, the rest evenly spaced), the Minitron depth-pruning
    recipe: a smaller student that shares the teacher's tokenizer, healed by the SFT that follows.
    """

    prune_to_layers: Optional[Count]


@dataclasses.dataclass(frozen=True)
class RolloutsConfig(GenerationConfig):
    """`rollouts`: π_ref samples `n_samples` responses per OPD prompt, keeping its log-probs."""

    n_samples: Count


@dataclasses.dataclass(frozen=True)
class TeacherTopkConfig(EngineConfig):
    """`teacher_topk`: the teacher scores every rollout token once (top-k + sampled token)."""

    k: NonNegInt
    logprob_dtype: Literal["float16", "float32"]
    # Optional privileged context prepended to the prompt for the teacher only, e.g.
    # "Answer: {answer}\n{prompt}"; recorded in the shard footer.
    privileged_context: Optional[str]
    # What is stored per position (pipeline/offline_opd/contract/sparse_targets.py): the top k ids, `samples` draws from the
    # teacher with unbiased importance weights, or both; plus π_ref's own top `union_student_k` ids.
    selection: Literal["topk", "sampled", "topk+sampled"]
    samples: Annotated[int, Range(ge=0, le=255)]   # draws per position (counts are stored in one byte)
    union_student_k: NonNegInt
    seed: NonNegInt                                # the draws are a function of (seed, sample_id)
    # Storage of ids and log-probs (pipeline/offline_opd/contract/codec.py); logprob_dtype applies to `plain` only.
    codec: Literal["plain", "q8", "q16"]


@dataclasses.dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """`distill`: trains π_ref on the precomputed teacher shards; no teacher in memory."""

    loss: str
    loss_params: dict
    kernel_backend: Literal["auto", "triton", "torch"]
    ce_weight: NonNeg
    tip_fraction: Annotated[float, Range(gt=0, le=1)]   # 1.0 keeps every token
    allow_inconsistent_teacher: bool
    # Data reader: DataLoader worker processes per rank, and how many row groups are mixed in one
    # shuffle window (the bounded shuffle buffer). Resuming needs the same values.
    num_workers: NonNegInt
    shuffle_row_groups: Count


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(EngineConfig):
    """`evaluate`: greedy accuracy with the task verifier, agreement with the teacher, divergence to it.

    `backend`/`batch_size` drive greedy generation; the divergences are HF forwards over
    `divergence_batch_size` sequences at a time (two models' logits are alive at once there).
    `verifier`: `numeric` (final number compared by value), `exact` (final segment equals the
    reference) or `module:function` (your own `f(response: str, answer: str) -> bool`).
    """

    max_new_tokens: Count
    n_eval: Optional[Count]
    verifier: str
    divergence_batch_size: Count


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "teacher": TeacherConfig,
    "sft_data": SftDataConfig,
    "sft": SftConfig,
    "rollouts": RolloutsConfig,
    "teacher_topk": TeacherTopkConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
}

C = TypeVar("C")


def read_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found (run from the repo root, or pass --params)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_section(section: str, path: Path | str = DEFAULT_PARAMS) -> Any:
    """Load and validate one section of the parameter file into its dataclass."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    data = read_params(path)
    if section not in data:
        raise ConfigError(f"{path}: missing section '{section}:' (see configs/toy.yaml for a complete example)")
    return parse_section(SECTIONS[section], data[section], f"{path}: {section}")


def load_all(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """Validate every section; used by `python -m offline_opd.tools.preset` and the tests."""
    return {name: load_section(name, path) for name in SECTIONS}


def parse_section(cls: type[C], raw: Any, where: str) -> C:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys are {', '.join(fields)}")
    missing = [f for f in fields if f not in raw]
    if missing:
        raise ConfigError(
            f"{where}.{missing[0]}: missing key (every key must be set in the file so DVC tracks it; "
            f"see configs/toy.yaml)"
        )
    values = {name: _coerce(raw[name], hints[name], f"{where}.{name}") for name in fields}
    parsed = cls(**values)
    check = getattr(parsed, "check", None)
    if check is not None:
        check(where)
    return parsed


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        value = _coerce(value, args[0], where)
        for extra in args[1:]:
            if isinstance(extra, Range) and value is not None:
                extra.check(value, where)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "3e-3" (no dot) as a string; accept numeric strings.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {hint} at {where}")
