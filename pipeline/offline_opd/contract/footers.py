"""The footers of the three shard kinds as typed records: what every part of a run says about its provenance.

A footer is the Parquet key/value metadata of a shard, each key prefixed `opd.` (`shards.META_PREFIX`),
each value a string: a `str` field as it is, any other field (and `privileged_context`) as JSON. The keys a
reader requires are the fields without a default; fields with a default are optional on read because
older writers did not write them (every writer here writes them all). `schema_version` is added by
`shards.write_shard`. No footer holds a time of writing: shards are DVC-hashed outputs, so a rerun with
identical inputs must write identical bytes (or everything downstream would rerun).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, Mapping, Optional

# Keys every footer carries, whatever its kind (write_shard fills them in).
COMMON = ("schema_version", "kind")


@dataclass(frozen=True, kw_only=True)
class Footer:
    """Base of the three kinds; `kind` names the stage that writes it."""

    kind: ClassVar[str]

    def to_meta(self) -> dict[str, str]:
        """The footer's key/values (without the `opd.` prefix), strings as stored."""
        out = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:  # an optional key this writer does not know
                continue
            out[f.name] = value if _raw(f) else json.dumps(value)
        return out

    @classmethod
    def required(cls) -> list[str]:
        """The keys a reader needs: COMMON plus every field without a default."""
        return [*COMMON, *(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)]

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> "Footer":
        """The typed footer of a shard's key/values (`shards.read_meta`); keys of other kinds are ignored."""
        values = {}
        for f in fields(cls):
            if f.name in meta:
                raw = meta[f.name]
                values[f.name] = raw if _raw(f) else json.loads(raw)
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class RunFooter(Footer):
    """What every part of a stage run records: the engine that produced its numbers
    (`backends.engine.engine_footer`), the tokenizer of its ids, and the run it belongs to (`shards.check_run`)."""

    backend: str
    backend_version: str
    tokenizer_fingerprint: str
    engine_dtype: Optional[str] = None
    max_model_len: Optional[int] = None
    run_key: Optional[str] = None
    num_parts: Optional[int] = None
    config: Optional[dict[str, Any]] = None    # the stage's params section


@dataclass(frozen=True, kw_only=True)
class RolloutsFooter(RunFooter):
    """Footer of `rollouts` parts: which policy sampled the rows, how, and from which prompts; with
    flawed-prefix rejection on (`rollouts.max_perplexity`), what it did in this part
    (`backends.rejection.Rejections`; absent when off)."""

    kind: ClassVar[str] = "rollouts"
    policy_fingerprint: str
    sampling_temperature: float
    policy_path: Optional[str] = None
    prompts_path: Optional[str] = None
    rejected_rows: Optional[int] = None
    rejected_response_tokens: Optional[int] = None
    resampled_rows: Optional[int] = None
    dropped_rows: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class SftDataFooter(RunFooter):
    """Footer of `sft_data` parts: which teacher answered the SFT prompts, and how."""

    kind: ClassVar[str] = "sft_data"
    teacher_fingerprint: str
    sampling_temperature: Optional[float] = None
    teacher_path: Optional[str] = None
    prompts_path: Optional[str] = None
    # Multi-teacher OPD only: domain -> model fingerprint of the teacher that answered it (`teacher_fingerprint`
    # is then the set's, `provenance.teachers.set_fingerprint`); the rows carry DOMAIN_FIELDS (tables.py).
    teachers: Optional[dict[str, str]] = None


@dataclass(frozen=True, kw_only=True)
class TeacherTopkFooter(RunFooter):
    """Footer of `teacher_topk` parts: the rollouts' policy fields unchanged, the teacher, and the entry format."""

    kind: ClassVar[str] = "teacher_topk"
    teacher_fingerprint: str
    policy_fingerprint: str
    k: int
    scoring_temperature: float
    privileged_context: Optional[str] = field(metadata={"json": True})   # JSON: null or the template
    policy_path: Optional[str] = None
    sampling_temperature: Optional[float] = None
    rollouts_run_key: Optional[str] = None
    teacher_path: Optional[str] = None
    logprob_dtype: Optional[str] = None
    codec: Optional[dict[str, Any]] = None     # name, version and parameters (`Codec.describe`)
    width: Optional[int] = None
    samples: Optional[int] = None
    selection: Optional[str] = None
    teachers: Optional[dict[str, str]] = None   # multi-teacher OPD only, as in SftDataFooter
    # What the rows are: None, π_ref's rollouts (`teacher_topk`); "sft_data", the teacher's own answers
    # (`sft_topk`, GKD's off-policy rows: the policy fields then name the teacher that wrote them).
    source: Optional[str] = None
    sft_data_run_key: Optional[str] = None

    @classmethod
    def of_rollouts(cls, policy: RolloutsFooter, **fields: Any) -> "TeacherTopkFooter":
        """A footer that copies the rollouts' policy fields unchanged (which policy sampled the rows, and how)."""
        return cls(policy_fingerprint=policy.policy_fingerprint, policy_path=policy.policy_path,
                   tokenizer_fingerprint=policy.tokenizer_fingerprint,
                   sampling_temperature=policy.sampling_temperature, rollouts_run_key=policy.run_key, **fields)

    @classmethod
    def of_sft_data(cls, sft: SftDataFooter, **fields: Any) -> "TeacherTopkFooter":
        """A footer for the teacher's own SFT answers (`sft_topk`, GKD's off-policy rows): the policy fields name
        the teacher that wrote them, at sft_data's temperature."""
        return cls(policy_fingerprint=sft.teacher_fingerprint, policy_path=sft.teacher_path,
                   tokenizer_fingerprint=sft.tokenizer_fingerprint, sampling_temperature=sft.sampling_temperature,
                   source="sft_data", sft_data_run_key=sft.run_key, **fields)


FOOTERS: dict[str, type[Footer]] = {f.kind: f for f in (RolloutsFooter, SftDataFooter, TeacherTopkFooter)}
REQUIRED_META: dict[str, list[str]] = {kind: footer.required() for kind, footer in FOOTERS.items()}


def _raw(f: Field) -> bool:
    """Whether a field is stored as the string itself (else as JSON)."""
    return f.type in ("str", "Optional[str]") and not f.metadata.get("json")
