"""The parameter schema: one dataclass per `params.yaml` section, validated at load.

Every stage reads one section, and `dvc.yaml` declares that section as the stage's params, so
editing a key reruns only the stages downstream of it (`teacher_topk` also reads
`distill.allow_inconsistent_teacher`, which decides only whether it refuses, never what it writes;
`sft_topk` scores with the `teacher_topk` section and declares both). All keys are required in the file: a
default hidden in code would be invisible to DVC's parameter tracking, and a run could change
behaviour without DVC noticing. The one exception is a key that does not apply to the file's own choice
(a section's `omittable`): the toy architecture and training keys of a pretrained `teacher.source`, the
architecture of a pretrained `sft.source`, `task.digits` of a prompt file. Such a key may be left out (it
reads as None, and nothing reads it); where it applies it is required like any other.

Every stage validates the whole file at load, not only its own section (offline_opd.validation, which
runs this module's `load_params` and then the checks that need the loss registry): ranges in the
types, cross-key rules in each section's `__post_init__`, cross-section rules (a k that leaves distill
nothing to match, greedy rollouts that distill cannot weight) in `check_params`. So a mistake in
`distill:` stops the first stage, not the seventh. Validation reads nothing else: what depends on the
machine or on a model folder is checked when the stage starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Optional, TypeVar

import yaml

from offline_opd.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(UserError, ValueError):
    """A parameter file is missing, malformed, or holds a bad value. The message names file and key."""


class RuleError(ConfigError):
    """A cross-key rule of one section, raised by its `__post_init__`, which knows the key but not the
    file; `parse_section` prefixes `params.yaml: section.` to `key`."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key, self.detail = key, detail


def refuse(key: str, detail: str) -> NoReturn:
    """Fail a cross-key rule inside `__post_init__`, naming the key of this section."""
    raise RuleError(key, detail)


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


# Every integer key fits a signed 32-bit int (what torch, numpy and Lightning accept for seeds,
# steps and sizes everywhere); a larger value is a typo, refused at load instead of overflowing later.
MAX_INT = 2**31 - 1

# The bounds most keys need, named once.
Count = Annotated[int, Range(ge=1)]            # sizes, steps, batch sizes: at least 1
NonNegInt = Annotated[int, Range(ge=0)]        # seeds, worker counts
Positive = Annotated[float, Range(gt=0)]       # learning rates, temperatures used as divisors
NonNeg = Annotated[float, Range(ge=0)]         # weights, clip norms, temperatures (0 = greedy)
Fraction = Annotated[float, Range(ge=0, le=1)]  # fractions and probabilities


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """`prepare`: the prompt sets. `kind: addition` generates the embedded toy task; `addition+reverse` the
    two-domain toy of multi-teacher OPD (pipeline/offline_opd/tasks/mixture.py)."""

    kind: Literal["addition", "file", "addition+reverse"]
    digits: Count
    n_sft: Count
    n_opd: Count
    n_eval: Count
    seed: NonNegInt
    # For kind=file: a JSONL or Parquet file with columns `prompt` and optionally `prompt_id`,
    # `answer` (reference answer for the verifier) and `split` (sft/opd/eval).
    prompt_file: Optional[str]
    # kind=addition: what the student's SFT budget never shows (tasks/addition.py GAPS: big_column, a column
    # summing to 15 or more; carry_out, a sum one digit wider than the operands). The SFT split opens with
    # gap_prompts prompts without it, so a budget of sft_data.n_prompts <= gap_prompts keeps it from π_ref, while
    # the teacher trains on the whole split (null: the split in drawn order).
    gap: Optional[Literal["big_column", "carry_out"]]
    gap_prompts: Optional[Count]
    # kind=addition: how the reference traces are written (tasks/addition.py STYLES: columns, terse, padded).
    style: Literal["columns", "terse", "padded"]

    @classmethod
    def omittable(cls, raw: dict) -> set[str]:
        """`digits`, `style`, `gap` and `gap_prompts` shape the toy additions only."""
        return {"digits", "style", "gap", "gap_prompts"} if raw.get("kind") != "addition" else set()

    def __post_init__(self) -> None:
        """A key the chosen kind would silently ignore is refused, and so is a gap the split cannot hold."""
        if self.kind != "file" and self.prompt_file is not None:
            refuse("prompt_file", f"set, but task.kind {self.kind!r} ignores it; set task.kind: file to use it, "
                                  "or prompt_file: null")
        # Like `digits`, the toy's keys may stay in a file switched to another kind, but not switched on there.
        switched_on = {"style": self.style not in (None, "columns"), "gap": self.gap is not None,
                       "gap_prompts": self.gap_prompts is not None}
        for key, on in switched_on.items():
            if self.kind != "addition" and on:
                refuse(key, f"{getattr(self, key)!r}, but task.kind {self.kind!r} ignores it (it shapes the toy "
                            "additions only); leave it out, or set task.kind: addition")
        if self.kind == "addition" and (self.gap is None) != (self.gap_prompts is None):
            refuse("gap_prompts" if self.gap is not None else "gap",
                   "null, but task.gap and task.gap_prompts go together (what the student's SFT budget never "
                   "shows, and how many prompts without it open the split); set both, or both null")
        if self.gap_prompts is not None and self.gap_prompts > self.n_sft:
            refuse("gap_prompts", f"{self.gap_prompts} is more than the {self.n_sft} SFT prompts (task.n_sft); "
                                  "lower it, or raise n_sft")


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

    def __post_init__(self) -> None:
        """Offloading moves FSDP's shards; without sharding there is nothing to offload."""
        if self.cpu_offload and self.strategy != "fsdp":
            refuse("cpu_offload", "true needs strategy: fsdp (it offloads FSDP's parameter and optimizer shards); "
                                  "set strategy: fsdp or cpu_offload: false")


@dataclasses.dataclass(frozen=True)
class ModelConfig(TrainConfig):
    """A model to train from scratch (`source: scratch`, with this architecture), an existing Hugging Face
    model path or hub id, or (teacher only) a GGUF file: a path or `package:<python package>/<file>.gguf`."""

    source: str
    hidden_size: Count
    num_layers: Count
    num_heads: Count
    intermediate_size: Count

    ARCHITECTURE = ("hidden_size", "num_layers", "num_heads", "intermediate_size")

    @classmethod
    def omittable(cls, raw: dict) -> set[str]:
        """The architecture builds a `scratch` model only; a pretrained source brings its own."""
        return set(cls.ARCHITECTURE) if raw.get("source") != "scratch" else set()

    def __post_init__(self) -> None:
        """A scratch Llama splits hidden_size into num_heads heads of an even size (rotary embeddings)."""
        super().__post_init__()
        if not self.source.strip():
            refuse("source", "empty; set scratch, a model folder or a hub id")
        if self.source == "scratch" and (self.hidden_size % self.num_heads or self.hidden_size // self.num_heads % 2):
            refuse("num_heads", f"{self.num_heads} heads do not split hidden_size {self.hidden_size} into heads "
                                f"of an even size; pick num_heads so that hidden_size / num_heads is an even integer")


# A domain names a folder under data/models/teacher/ and a value in shard columns: a plain name.
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """`teacher`: trains the toy teacher on reference answers, or resolves and fingerprints a real one.

    `domains` (multi-teacher OPD, README: Multi-teacher OPD): `{}` is one teacher for every prompt (today's
    pipeline, unchanged). Otherwise it maps each prompt domain (the prompts' `domain` column) to its teacher:
    a mapping of keys of this section that differ for that domain's teacher (`{}`: the keys above; a
    `source: scratch` teacher trains on its own domain's SFT traces only), or the name of another domain,
    whose teacher then answers and scores this domain too (the single-teacher baselines of the toy).

    A scratch teacher holds out the last `holdout` SFT prompts (at most a tenth of them) from training and
    reports its greedy exact match on them, generating `eval_batch_size` prompts at a time.
    `finetune_steps` > 0 first fine-tunes a real source (GGUF or model folder) for that many steps on the
    SFT prompts' answers with the training keys (pipeline/offline_opd/train/finetune.py); 0 (or omitted)
    uses the source as it is. `max_steps` is the toy teacher's (`source: scratch`) only.
    """

    holdout: NonNegInt
    eval_batch_size: Count
    finetune_steps: NonNegInt
    domains: Optional[dict]   # None (left out, as every key of a pretrained teacher may be) = {}

    SCRATCH_ONLY = ("max_steps", "holdout", "eval_batch_size")

    @classmethod
    def omittable(cls, raw: dict) -> set[str]:
        """A teacher that is not `scratch` is not trained here unless fine-tuned: then only the architecture and
        the toy teacher's keys are unused; otherwise every training key is."""
        if raw.get("source") == "scratch":
            return set()
        if raw.get("finetune_steps"):
            return set(cls.ARCHITECTURE) | set(cls.SCRATCH_ONLY) | {"domains"}
        return {f.name for f in dataclasses.fields(cls)} - {"source"}

    def __post_init__(self) -> None:
        """A scratch teacher is trained by `max_steps` (a second step count would be ignored); domain names and
        routes are checked."""
        super().__post_init__()
        if self.source == "scratch" and self.finetune_steps:
            refuse("finetune_steps", f"{self.finetune_steps} with source: scratch, which trains for max_steps; "
                                     f"set finetune_steps: 0 (it fine-tunes a real source)")
        for name, spec in (self.domains or {}).items():
            if not DOMAIN_NAME.fullmatch(name):
                refuse(f"domains.{name}", "not a domain name; use letters, digits, '_', '-' or '.' (it names a "
                                          "folder under data/models/teacher)")
            if isinstance(spec, str):
                if not isinstance(self.domains.get(spec), dict):
                    refuse(f"domains.{name}", f"{spec!r} names no domain with a teacher of its own; name one of "
                                              f"{', '.join(self.experts()) or 'none'}, or give {name} a mapping")
            elif isinstance(spec, dict):
                self.expert(name)
            else:
                refuse(f"domains.{name}", f"expected a mapping of teacher keys or another domain's name, got {spec!r}")

    def experts(self) -> list[str]:
        """The domains with a teacher of their own (one folder each under data/models/teacher)."""
        return [name for name, spec in (self.domains or {}).items() if isinstance(spec, dict)]

    def routes(self) -> dict[str, str]:
        """Prompt domain -> the domain whose teacher answers and scores it."""
        return {name: spec if isinstance(spec, str) else name for name, spec in (self.domains or {}).items()}

    def expert(self, name: str) -> "TeacherConfig":
        """Domain `name`'s teacher: this section with the domain's keys in place (and no domains of its own)."""
        overrides = self.domains[name]
        if "domains" in overrides:
            refuse(f"domains.{name}.domains", "a domain's teacher has no domains of its own; remove the key")
        # Keys left out (None: a pretrained teacher's training keys) stay out, so a domain that turns scratch must set them.
        raw = {**{k: v for k, v in dataclasses.asdict(self).items() if v is not None}, **overrides, "domains": {}}
        try:
            return parse_section(TeacherConfig, raw, f"domains.{name}")
        except RuleError:
            raise
        except ConfigError as exc:
            key, _, detail = str(exc).partition(": ")
            raise RuleError(key, detail) from None

    def spec(self) -> dict:
        """The settings a teacher folder's provenance records: every key but `domains` (one teacher's own)."""
        values = dataclasses.asdict(self)
        values.pop("domains")
        return values


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
    max_model_len: Annotated[int, Range(ge=2)]   # prompt + response tokens (one of each at least); longer refused
    kv_cache_gib: Positive     # vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE on CPU); unused by hf


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """`<section>.cluster`: where a stage's engine runs, in this process (`local`) or on a Ray Data actor pool (`ray`).

    With `ray`, `replicas` actors each hold one engine on `cpus_per_replica` CPUs and `gpus_per_replica` GPUs
    (vLLM splits a model over an actor's GPUs with tensor parallelism) and take the stage's parts one at a
    time (pipeline/offline_opd/backends/pool.py). `address` names a running Ray cluster (`auto`, `host:6379`,
    `ray://host:10001`); null starts a local one on this machine. No key here changes a row the stage writes,
    so `run_settings` leaves the whole section out of run keys and footers: a run resumed with other values
    keeps its finished parts. `local` runs one engine in the stage's process and reads only `gpus_per_replica`
    (several GPUs: vLLM's tensor parallel size).
    """

    backend: Literal["local", "ray"]
    address: Optional[str]
    replicas: Count
    cpus_per_replica: Annotated[float, Range(ge=0)]
    gpus_per_replica: Annotated[float, Range(ge=0)]

    @property
    def tensor_parallel(self) -> int:
        """GPUs one engine spans (vLLM's tensor_parallel_size): gpus_per_replica when it is several, else 1."""
        return max(1, int(self.gpus_per_replica))

    def __post_init__(self) -> None:
        """Ray accepts a fraction of one GPU, but several GPUs per actor only whole (vLLM's tensor parallel size)."""
        if self.gpus_per_replica > 1 and not float(self.gpus_per_replica).is_integer():
            refuse("gpus_per_replica", f"{self.gpus_per_replica:g} is a fraction above 1; use a fraction of one GPU "
                                       f"(<= 1) or a whole number of GPUs (vLLM's tensor parallel size)")


@dataclasses.dataclass(frozen=True)
class StageEngineConfig(EngineConfig):
    """The engine keys of a stage section plus `cluster`: where that stage's engine runs and how many copies."""

    cluster: ClusterConfig

    def __post_init__(self) -> None:
        """Several GPUs per replica is vLLM tensor parallelism; the hf engine would use one of them and idle the rest."""
        if self.cluster.gpus_per_replica > 1 and self.backend != "vllm":
            refuse("cluster.gpus_per_replica", f"{self.cluster.gpus_per_replica:g} GPUs per replica need backend: "
                                               f"vllm (tensor parallel); backend {self.backend} runs on one GPU: set "
                                               f"gpus_per_replica <= 1 and raise replicas instead")


def run_settings(cfg: Any) -> dict:
    """A section's keys that decide the rows a stage writes: all of them but `cluster` (where the work runs)
    and the keys the section calls inert at their values (`inert_keys`: a feature switched off).

    Run keys and shard footers are built from these, so moving a stage between `local` and `ray`, or changing
    `replicas`, keeps every finished part (DVC still reruns the stage, which then only checks the footers),
    and a feature left off writes the footers and run keys it wrote before the feature existed.
    """
    values = dataclasses.asdict(cfg)
    values.pop("cluster", None)
    for key in getattr(cfg, "inert_keys", lambda: ())():
        values.pop(key)
    return values


@dataclasses.dataclass(frozen=True)
class GenerationConfig(StageEngineConfig):
    """Settings shared by every stage that generates text with a model."""

    max_new_tokens: Count
    temperature: NonNeg
    rows_per_shard: Count
    seed: NonNegInt

    def __post_init__(self) -> None:
        super().__post_init__()
        check_new_tokens(self.max_new_tokens, self.max_model_len)


@dataclasses.dataclass(frozen=True)
class SftDataConfig(GenerationConfig):
    """`sft_data`: the teacher answers the SFT prompts (this ties SFT to the teacher).

    `n_prompts`: the teacher answers only the first n SFT prompts (null: all of them), π_ref's SFT budget. A
    teacher's answers are the expensive data, so a student is often fine-tuned on far fewer of them than the
    teacher was trained on (configs/toy_sft_budget.yaml: README "The paper's claim").
    """

    n_prompts: Optional[Count]

    def inert_keys(self) -> tuple[str, ...]:
        """null answers every prompt, as before the key existed: the parts' run keys and footers stay the same."""
        return ("n_prompts",) if self.n_prompts is None else ()


@dataclasses.dataclass(frozen=True)
class SftConfig(ModelConfig):
    """`sft`: the student base fine-tuned on the teacher's answers.

    `source`: `scratch` (a toy Llama on the teacher's tokenizer), `teacher` (the teacher's own
    weights) or a model folder / hub id. `prune_to_layers`: keep only this many decoder layers of
    a pretrained base (first and last kept, the rest evenly spaced), the Minitron depth-pruning
    recipe: a smaller student that shares the teacher's tokenizer, healed by the SFT that follows.
    """

    prune_to_layers: Optional[Count]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_to_layers is not None and self.source == "scratch":
            refuse("prune_to_layers", f"{self.prune_to_layers} prunes a pretrained base, but sft.source is "
                                      f"'scratch'; set sft.num_layers instead, or prune_to_layers: null")


@dataclasses.dataclass(frozen=True)
class RolloutsConfig(GenerationConfig):
    """`rollouts`: π_ref samples `n_samples` responses per OPD prompt, keeping its log-probs.

    Flawed-prefix rejection (offline_opd.backends.rejection): a response whose perplexity under the sampling
    policy, exp(−mean of its behaviour log-probs), exceeds `max_perplexity` is dropped before teacher_topk
    scores it (null: off), and redrawn up to `resample_budget` times (0: dropped for good).
    """

    n_samples: Count
    max_perplexity: Optional[Annotated[float, Range(ge=1)]]
    resample_budget: NonNegInt

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resample_budget and self.max_perplexity is None:
            refuse("resample_budget", f"{self.resample_budget} redraws rejected responses, but max_perplexity is "
                                      f"null (rejection off); set max_perplexity, or resample_budget: 0")

    def inert_keys(self) -> tuple[str, ...]:
        """With rejection off its keys change no row (`run_settings`)."""
        return ("max_perplexity", "resample_budget") if self.max_perplexity is None else ()


@dataclasses.dataclass(frozen=True)
class TeacherTopkConfig(StageEngineConfig):
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
    codec: Literal["plain", "q8", "q16", "compact"]

    def __post_init__(self) -> None:
        """Which stored entries the settings make: draws need a sampling selection, vLLM stores top-k only."""
        super().__post_init__()
        if (self.selection == "topk") != (self.samples == 0):
            refuse("samples", f"{self.samples} with selection {self.selection}: draws need selection sampled or "
                              f"topk+sampled and samples >= 1; top-k alone needs samples: 0")
        if self.union_student_k and self.selection == "sampled":
            refuse("union_student_k", "adds π_ref's ids to the top-k, but selection sampled stores no top-k; "
                                      "use selection topk or topk+sampled, or union_student_k: 0")
        if self.backend == "vllm" and (self.selection != "topk" or self.union_student_k):
            refuse("backend", f"vllm returns only top-k log-probs; selection {self.selection} and "
                              f"union_student_k {self.union_student_k} need backend: hf")
        if self.privileged_context is not None:
            check_template(self.privileged_context)


@dataclasses.dataclass(frozen=True)
class SftTopkConfig:
    """`sft_topk`: the teacher also scores its own SFT answers (`data/sft`) into `data/sft_topk`, with every
    `teacher_topk` setting, for GKD's off-policy share (`distill.gkd`). Off by default: the default DAG then
    scores nothing more than before (the stage writes an empty folder)."""

    enabled: bool


@dataclasses.dataclass(frozen=True)
class GkdConfig:
    """`distill.gkd`: GKD's sampling mixture (pipeline/offline_opd/train/gkd.py). A fraction λ of every batch's
    sequences are π_ref's rollouts (on-policy), 1 − λ the teacher's SFT answers (`sft_topk`); λ goes from
    `lambda_start` linearly to `lambda_end` over the first `ramp_frac` of training. All 1 (and ramp 0):
    today's pure on-policy run."""

    lambda_start: Fraction
    lambda_end: Fraction
    ramp_frac: Fraction

    def __post_init__(self) -> None:
        """Without a ramp λ is lambda_end from the first step, so a different lambda_start would never apply."""
        if self.ramp_frac == 0 and self.lambda_start != self.lambda_end:
            refuse("ramp_frac", f"0 holds λ at lambda_end ({self.lambda_end:g}) from the first step, so lambda_start "
                                f"{self.lambda_start:g} would never apply; set ramp_frac > 0 to ramp, or "
                                f"lambda_start: {self.lambda_end:g}")

    @property
    def off_policy(self) -> bool:
        """Whether any step trains on teacher-written rows."""
        return min(self.lambda_start, self.lambda_end) < 1


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
    gkd: GkdConfig


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(StageEngineConfig):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_new_tokens(self.max_new_tokens, self.max_model_len)


def check_new_tokens(max_new_tokens: int, max_model_len: int) -> None:
    """max_model_len counts prompt and response tokens: a response cap that fills it leaves no room for a prompt."""
    if max_new_tokens >= max_model_len:
        refuse("max_new_tokens", f"{max_new_tokens} leaves no room for a prompt within max_model_len "
                                 f"{max_model_len} (prompt + response tokens); lower max_new_tokens or raise "
                                 f"max_model_len")


TEMPLATE_FIELDS = ("prompt", "answer")


def check_template(template: str) -> None:
    """teacher_topk.privileged_context is filled with str.format: only {prompt} and {answer}, well formed."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        refuse("privileged_context", f"{template!r} is not a format template ({exc}); write literal braces as "
                                     f"{{{{ and }}}}")
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        refuse("privileged_context", f"{template!r}: only {{prompt}} and {{answer}} may appear (found "
                                     f"{', '.join(repr(f) for f in unknown)})")


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "teacher": TeacherConfig,
    "sft_data": SftDataConfig,
    "sft": SftConfig,
    "rollouts": RolloutsConfig,
    "teacher_topk": TeacherTopkConfig,
    "sft_topk": SftTopkConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
}

C = TypeVar("C")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last one
    silently, so an edit to the first copy of `lr:` would change nothing)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is set twice in one section (line {key_node.start_mark.line + 1}); "
                                f"keep one", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found (run from the repo root, or pass --params)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); pass a readable YAML file with --params") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_section(section: str, path: Path | str = DEFAULT_PARAMS) -> Any:
    """Validate the file (`load_params`) and return one section's dataclass; the section must be present."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    return load_params(path, required=(section,))[section]


def load_all(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """Every section, all required, and the rules of this module checked (offline_opd.validation adds the rest)."""
    return load_params(path, required=tuple(SECTIONS))


def load_params(path: Path | str, required: tuple[str, ...]) -> dict[str, Any]:
    """Parse every known section the file holds and run the cross-section rules among them.

    A section a stage does not read may be absent (tests and tools write partial files; DVC itself
    refuses a params.yaml that lacks a declared section), but whatever is present is checked, so a
    bad `distill:` key stops `prepare` instead of the seventh stage.
    """
    data = read_params(path)
    for name in required:
        if name not in data:
            raise ConfigError(f"{path}: missing section '{name}:' (see configs/toy.yaml for a complete example)")
    cfgs = {name: parse_section(cls, data[name], f"{path}: {name}") for name, cls in SECTIONS.items() if name in data}
    check_params(cfgs, str(path))
    return cfgs


def check_params(cfgs: dict[str, Any], path: str) -> None:
    """The rules that span sections, over the sections in `cfgs` (those that need the loss registry or the
    verifiers are in offline_opd.validation, which stages and opd-preset run after this)."""
    task, topk, rollouts, distill, evaluate = (cfgs.get(n) for n in ("task", "teacher_topk", "rollouts", "distill",
                                                                       "evaluate"))
    teacher, sft = cfgs.get("teacher"), cfgs.get("sft")
    if distill is not None and topk is not None and distill.loss != "pg" and topk.selection == "topk" \
            and topk.k == 0 and topk.union_student_k == 0:
        raise ConfigError(f"{path}: teacher_topk.k: 0 stores no teacher entries, so distill.loss "
                          f"{distill.loss!r} has nothing to match (its divergence is 0 on every token and "
                          f"training would change nothing); set k >= 1, or distill.loss: pg (which needs "
                          f"only the sampled token's log-prob)")
    if distill is not None and rollouts is not None and rollouts.temperature == 0:
        raise ConfigError(f"{path}: rollouts.temperature: 0 is greedy decoding, but distill weighs π_ref's "
                          f"samples by their log-probs at the sampling temperature, which greedy rollouts do "
                          f"not have; set rollouts.temperature > 0 (1.0 samples π_ref itself)")
    check_gkd(distill, topk, cfgs.get("sft_topk"), path)
    if topk is not None and rollouts is not None and topk.max_model_len < rollouts.max_model_len:
        raise ConfigError(f"{path}: teacher_topk.max_model_len: {topk.max_model_len} is shorter than the "
                          f"rollouts it scores (rollouts.max_model_len {rollouts.max_model_len}); set it to at "
                          f"least {rollouts.max_model_len}")
    if sft is not None and teacher is not None and sft.source == "teacher" and teacher.source == "scratch" \
            and sft.prune_to_layers is not None and sft.prune_to_layers > teacher.num_layers:
        raise ConfigError(f"{path}: sft.prune_to_layers: {sft.prune_to_layers} keeps more layers than the "
                          f"scratch teacher has (teacher.num_layers {teacher.num_layers}); lower it, or null")
    sft_data = cfgs.get("sft_data")
    if task is not None and sft_data is not None and task.gap_prompts is not None \
            and (sft_data.n_prompts is None or sft_data.n_prompts > task.gap_prompts):
        budget = "all of them" if sft_data.n_prompts is None else f"the first {sft_data.n_prompts}"
        raise ConfigError(f"{path}: task.gap_prompts: {task.gap_prompts} keeps task.gap {task.gap!r} out of only "
                          f"the first {task.gap_prompts} SFT prompts, but sft_data.n_prompts gives the student "
                          f"{budget}, the gap included; set sft_data.n_prompts <= {task.gap_prompts}, or "
                          f"task.gap and task.gap_prompts: null")
    if evaluate is not None and task is not None and task.style == "padded" and evaluate.verifier == "exact":
        raise ConfigError(f"{path}: task.style: padded writes answers one digit wider (=0577 for 577), which "
                          f"evaluate.verifier: exact never accepts; use verifier: numeric (compares by value), or "
                          f"style: columns")
    if evaluate is not None and task is not None and task.kind == "addition" and evaluate.n_eval is not None \
            and evaluate.n_eval > task.n_eval:
        raise ConfigError(f"{path}: evaluate.n_eval: {evaluate.n_eval} is more than the "
                          f"{task.n_eval} eval prompts task.n_eval makes; lower it, or null for all")


def check_gkd(distill: Any, topk: Any, sft_topk: Any, path: str) -> None:
    """GKD's off-policy rows exist only if `sft_topk` scores them, in teacher_topk's format, and only the
    divergence losses can train on them (pg's ratio is against π_ref, which did not write them)."""
    if sft_topk is not None and sft_topk.enabled and topk is not None and topk.union_student_k:
        raise ConfigError(f"{path}: sft_topk.enabled: true scores the teacher's SFT answers in teacher_topk's format, "
                          f"but teacher_topk.union_student_k: {topk.union_student_k} adds π_ref's top ids, which "
                          f"sft_topk (no π_ref) cannot; set union_student_k: 0, or sft_topk.enabled: false")
    if distill is None or not distill.gkd.off_policy:
        return
    key = "lambda_start" if distill.gkd.lambda_start < 1 else "lambda_end"
    value = getattr(distill.gkd, key)
    if sft_topk is not None and not sft_topk.enabled:
        raise ConfigError(f"{path}: distill.gkd.{key}: {value:g} trains on the teacher's own sequences, which "
                          f"sft_topk.enabled: false does not score; set sft_topk.enabled: true (`dvc repro` then "
                          f"runs sft_topk), or {key}: 1")
    if distill.loss == "pg":
        raise ConfigError(f"{path}: distill.gkd.{key}: {value:g} mixes in the teacher's own sequences, but "
                          f"distill.loss pg weighs π_ref's samples by their ratio to π_ref, which did not write "
                          f"those; use a divergence loss (fkl, jsd, ...) or {key}: 1")


def parse_section(cls: type[C], raw: Any, where: str) -> C:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys are {', '.join(fields)}")
    optional = cls.omittable(raw) if hasattr(cls, "omittable") else set()
    missing = [f for f in fields if f not in raw and f not in optional]
    if missing:
        raise ConfigError(
            f"{where}.{missing[0]}: missing key (every key must be set in the file so DVC tracks it; "
            f"see configs/toy.yaml)"
        )
    values = {name: _coerce(raw[name], hints[name], f"{where}.{name}") if name in raw else None for name in fields}
    try:
        return cls(**values)
    except RuleError as exc:
        raise ConfigError(f"{where}.{exc.key}: {exc.detail}") from None


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
        if abs(value) > MAX_INT:
            raise ConfigError(f"{where}: {value} is too large; integer keys must lie within ±{MAX_INT}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)   # YAML reads "3e-3" (no dot) as a string; numeric strings are accepted
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        except OverflowError:       # an integer beyond a float's range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {value!r} is not a finite number; set a finite value")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return parse_section(hint, value, where)
    if hint is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise ConfigError(f"{where}: key {bad!r} is not a name; keys are parameter names such as tau")
        return dict(value)
    raise TypeError(f"unsupported config type {hint} at {where}")
