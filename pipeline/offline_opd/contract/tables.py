"""The columns of every shard kind, the builders of their tables, and how a teacher shard's columns decode.

One row is one sampled response (rollouts, teacher_topk) or one teacher answer (sft_data); a teacher shard
is its rollout shard plus the teacher's columns (docs/design.md §4). The stages, `online_distill` and the
benches build their tables here, so a column is named and typed in one place; `shards` writes, checks and
reads them, `codec` encodes the entries.

Schema versions (footer `opd.schema_version`; readers take every version in READABLE_VERSIONS):
1 the first; 2 adds the exact tail, codecs and sampled entries to teacher shards; 3 names π_ref's
sampling-time log-prob `behavior_logprob` (before: `student_logprobs`; the readers rename it, so code
only ever sees the new name) and adds the `compact` codec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from offline_opd.contract.codec import Codec, Plain, codec_from_meta, flat, make_codec
from offline_opd.contract.sparse_targets import Selection, entry_weights
from offline_opd.errors import UserError

SCHEMA_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
BEHAVIOR = "behavior_logprob"   # π_ref's log-prob of each response token at sampling time (the behaviour policy)
# column -> (its name in older schema versions, those versions)
RENAMED = {BEHAVIOR: ("student_logprobs", ("1", "2"))}

ROLLOUT_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("prompt_len", pa.int32(), nullable=False),
    pa.field(BEHAVIOR, pa.list_(pa.float32()), nullable=False),
]
ROLLOUT_SCHEMA = pa.schema(ROLLOUT_FIELDS)

SFT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("prompt_len", pa.int32(), nullable=False),
])


# Multi-teacher OPD (README: Multi-teacher OPD): the sft_data and teacher_topk rows of a run with domain teachers
# carry these two columns, and the footer key `teachers` maps each domain to its teacher's fingerprint. Per row
# and not only per part: one part mixes domains, a row names the teacher that wrote or scored it on its own
# (a DuckDB `GROUP BY domain, teacher_fingerprint` shows the mix), and the check that each row's teacher is its
# domain's (provenance.consistency.check_row_teachers) needs nothing but the shard. Both columns are dictionary
# encoded (a few bytes per row group). Single-teacher shards have neither column nor key, byte for byte as before.
DOMAIN_FIELDS = [
    pa.field("domain", pa.string(), nullable=False),
    pa.field("teacher_fingerprint", pa.string(), nullable=False),
]
DOMAIN_COLUMNS = [f.name for f in DOMAIN_FIELDS]


def has_domains(meta: Mapping[str, str]) -> bool:
    """Whether a shard's footer (`shards.read_meta`) describes a multi-teacher run, whose rows carry DOMAIN_FIELDS."""
    return "teachers" in meta


def with_domains(schema: pa.Schema, domains: bool = True) -> pa.Schema:
    """`schema` plus the multi-teacher columns (when `domains`)."""
    return pa.schema(list(schema) + DOMAIN_FIELDS) if domains else schema


def add_domains(table: pa.Table, domains: Sequence[str], teachers: Mapping[str, str]) -> pa.Table:
    """The rows of `table` with their domain and the fingerprint of the teacher (`teachers[domain]`) that made them."""
    table = table.append_column(DOMAIN_FIELDS[0], pa.array(list(domains), pa.string()))
    return table.append_column(DOMAIN_FIELDS[1], pa.array([teachers[d] for d in domains], pa.string()))


def stored_name(name: str, version: str) -> str:
    """The name column `name` has in a shard of schema `version`."""
    old, versions = RENAMED.get(name, (name, ()))
    return old if version in versions else name


def current_names(table: pa.Table, version: str) -> pa.Table:
    """`table` read from a shard of schema `version`, with today's column names."""
    back = {stored_name(n, version): n for n in RENAMED}
    return table.rename_columns([back.get(n, n) for n in table.column_names])


@dataclass(frozen=True)
class TeacherFormat:
    """What one run's teacher shards hold beyond the rollout columns (all its parts agree)."""

    codec: Codec
    width: int          # stored entries per response position
    samples: int        # draws per position behind `sample_counts` (0: no sampled entries)
    exact_tail: bool    # `tail_logprob` stored (shards v2); else the tail is rebuilt from the entries

    def fields(self) -> list[pa.Field]:
        out = [pa.field("teacher_logprob", pa.list_(pa.float32()), nullable=False)]
        if self.exact_tail:
            out.append(pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False))
        out += self.codec.fields()
        if self.samples:
            out.append(pa.field("sample_counts", pa.list_(pa.uint8()), nullable=False))
        return out

    def widths(self) -> dict[str, int]:
        """Values per response token of every teacher column."""
        out = {"teacher_logprob": 1, **self.codec.widths(self.width)}
        if self.exact_tail:
            out["tail_logprob"] = 1
        if self.samples:
            out["sample_counts"] = self.width
        return out

    def encodings(self) -> dict[str, str]:
        """Parquet encodings of the teacher columns that differ from the writer's default (the codec's)."""
        return self.codec.encodings()

    def decode(self, table: pa.Table) -> dict[str, np.ndarray | None]:
        """Per response token, row-major: topk_ids / topk_logprobs [n, W], tail_logprob [n] (None without
        an exact tail), entry_weights [n, W] (None unless sampled)."""
        n = len(table.column("teacher_logprob").combine_chunks().flatten())
        ids, lps = self.codec.decode(table, self.width, n)
        tail = flat(table, "tail_logprob").astype(np.float32) if self.exact_tail else None
        weights = None
        if self.samples:
            counts = flat(table, "sample_counts").reshape(n, self.width)
            weights = entry_weights(counts, lps, tail, self.samples)
        return {"topk_ids": ids, "topk_logprobs": lps, "tail_logprob": tail, "entry_weights": weights}


def teacher_schema(fmt: TeacherFormat | str = "float16", domains: bool = False) -> pa.Schema:
    """Rollout columns plus the teacher columns of `fmt` (a logprob dtype: plain top-k with exact tail), plus the
    multi-teacher columns when `domains`."""
    if isinstance(fmt, str):
        fmt = TeacherFormat(Plain(fmt), width=0, samples=0, exact_tail=True)
    return with_domains(pa.schema(ROLLOUT_FIELDS + fmt.fields()), domains)


def teacher_format(cfg: Any, vocab: int, params: Path | str = "params.yaml", teacher: Path | str = "the teacher"
                   ) -> TeacherFormat:
    """The format a `teacher_topk` run with settings `cfg` (`config.TeacherTopkConfig`) writes: its selection's
    entries plus `union_student_k` of π_ref's, the codec sized to the teacher's vocabulary (`vocab` tokens, of
    model `teacher`), which k and union_student_k must not exceed (`params` names the file in the error)."""
    if cfg.k > vocab:
        raise UserError(f"{params}: teacher_topk.k: {cfg.k} is more than the teacher's vocabulary ({vocab} "
                        f"tokens, {teacher}); lower k")
    if cfg.union_student_k > vocab:
        raise UserError(f"{params}: teacher_topk.union_student_k: {cfg.union_student_k} is more than the "
                        f"vocabulary ({vocab} tokens, {teacher}); lower union_student_k")
    selection = Selection.of(cfg)
    return TeacherFormat(make_codec(cfg.codec, cfg.logprob_dtype, vocab), selection.width(cfg.union_student_k),
                         selection.samples, exact_tail=True)


def teacher_format_of(path: Path, meta: Mapping[str, str]) -> TeacherFormat:
    """The teacher format a shard's footer describes (footers written before v2 describe plain top-k)."""
    width = int(json.loads(meta.get("width", meta.get("k", "0"))))
    return TeacherFormat(codec_from_meta(meta, _logprob_dtype(path)), width=width,
                         samples=int(meta.get("samples", "0")), exact_tail=meta.get("schema_version") != "1")


def _logprob_dtype(path: Path) -> str:
    """float16 or float32: what a plain shard's `topk_logprobs` hold (footers before codecs do not say)."""
    schema = pq.read_schema(path)
    if "topk_logprobs" not in schema.names:
        return "float16"  # the schema check then reports the missing column by name
    return "float32" if pa.types.is_float32(schema.field("topk_logprobs").type.value_type) else "float16"


def rollout_table(prompt_ids: list[str], prompt_tokens: list[list[int]],
                  samples: Sequence[Sequence[Any]]) -> pa.Table:
    """Rows of one rollouts part from the engines' records (`backends.base.Sample`; not imported, so that the
    contract stays out of the backends' dependencies), samples[p][i] the i-th response to prompt p: sample i
    of prompt p is `p#i`; input_ids are prompt + response, as π_ref saw them. A None sample (rejected,
    `backends.rejection`) has no row."""
    rows = [(pid, i, ids, s) for pid, ids, row in zip(prompt_ids, prompt_tokens, samples) for i, s in enumerate(row)
            if s is not None]
    return pa.table({
        "sample_id": [f"{pid}#{i}" for pid, i, _, _ in rows],
        "prompt_id": [pid for pid, _, _, _ in rows],
        "input_ids": pa.array([ids + s.response_ids for _, _, ids, s in rows], pa.list_(pa.int32())),
        "prompt_len": pa.array([len(ids) for _, _, ids, _ in rows], pa.int32()),
        BEHAVIOR: pa.array([s.logprobs for _, _, _, s in rows], pa.list_(pa.float32())),
    }, schema=ROLLOUT_SCHEMA)


def sft_table(prompt_ids: list[str], prompts: list[str], prompt_tokens: list[list[int]], samples: Sequence[Any],
              tokenizer: Any) -> pa.Table:
    """Rows of one sft_data part: the teacher's answer (a `backends.base.Sample`) to each prompt."""
    return pa.table({
        "prompt_id": prompt_ids,
        "prompt": prompts,
        "response": tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True),
        "input_ids": pa.array([p + s.response_ids for p, s in zip(prompt_tokens, samples)], pa.list_(pa.int32())),
        "prompt_len": pa.array([len(p) for p in prompt_tokens], pa.int32()),
    }, schema=SFT_SCHEMA)


def teacher_written_rows(sft: pa.Table, sampling_temperature: float) -> pa.Table:
    """sft_data rows in the rollout columns, so that `sft_topk` scores the teacher's own answers into the teacher
    shard contract (GKD's off-policy rows): sample_id `prompt_id#0`; `behavior_logprob` is the writer's
    log-prob, 0 per token for greedy answers (a point mass: log 1) and NaN for sampled ones, whose log-probs
    sft_data does not keep (pg, the one loss that reads it, refuses off-policy rows)."""
    ids = sft.column("input_ids").combine_chunks()
    lengths = (pc.list_value_length(ids).to_numpy(zero_copy_only=False)
               - sft.column("prompt_len").to_numpy().astype(np.int64))
    value = 0.0 if sampling_temperature == 0 else np.nan
    return pa.table({
        "sample_id": [f"{pid}#0" for pid in sft.column("prompt_id").to_pylist()],
        "prompt_id": sft.column("prompt_id"),
        "input_ids": ids,
        "prompt_len": sft.column("prompt_len"),
        BEHAVIOR: _ragged([np.full(n, value, np.float32) for n in lengths], pa.float32()),
    }, schema=ROLLOUT_SCHEMA)


def scored_table(rollouts: pa.Table, scored: Sequence[Any], fmt: TeacherFormat) -> pa.Table:
    """The rollout rows plus the teacher columns of `fmt`, one `backends.base.Scored` per row (entries encoded
    by the codec; `sample_counts` follow the order the codec stores the entries in)."""
    rows = []
    for s in scored:
        columns, order = fmt.codec.encode(s.topk_ids, s.topk_logprobs)
        counts = s.sample_counts
        if counts is not None and order is not None:
            counts = np.take_along_axis(counts, order, 1)
        rows.append({"teacher_logprob": s.teacher_logprob, "tail_logprob": s.tail_logprob, "sample_counts": counts,
                     **columns})
    for field in fmt.fields():
        rollouts = rollouts.append_column(field.name, _ragged([r[field.name] for r in rows], field.type.value_type))
    return rollouts


def scored_stats(rollouts: pa.Table, scored: Sequence[Any]) -> dict:
    """Sums over one scored part for teacher_topk's metrics: response tokens, the teacher's total log-prob of
    the sampled tokens, and how many sampled tokens are among the stored ids."""
    stats = {"response_tokens": 0, "sum_teacher_logprob": 0.0, "sampled_in_topk": 0}
    for s, seq, p in zip(scored, rollouts.column("input_ids").to_pylist(), rollouts.column("prompt_len").to_pylist()):
        stats["response_tokens"] += s.teacher_logprob.size
        stats["sum_teacher_logprob"] += float(s.teacher_logprob.sum())
        stats["sampled_in_topk"] += int((s.topk_ids == np.asarray(seq[p:])[:, None]).any(1).sum())
    return stats


def _ragged(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """One list<value_type> array from per-row numpy arrays (flattened row-major), without Python per-value work."""
    lengths = np.array([a.size for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))


def view_sql(kind: str, version: str, fmt: TeacherFormat | None) -> str:
    """The select list over a shard's stored columns that `opd-inspect`'s `shards` view uses: today's column
    names, a NULL `tail_logprob` for version 1 teacher shards, and the entries decoded by the codec
    (`Codec.sql_columns`, the same decoding as `Codec.decode`)."""
    renames = [f"{stored_name(n, version)} AS {n}" for n in RENAMED if stored_name(n, version) != n]
    decoded = fmt.codec.sql_columns(fmt.width) if kind == "teacher_topk" and fmt is not None else {}
    stored = [f.name for f in fmt.codec.fields()] if decoded else []
    star = "*" + (f" EXCLUDE ({', '.join(stored)})" if stored else "") + \
        (f" RENAME ({', '.join(renames)})" if renames else "")
    extra = [f"{expr} AS {name}" for name, expr in decoded.items()]
    if kind == "teacher_topk" and fmt is not None and not fmt.exact_tail:
        extra.append("NULL::FLOAT[] AS tail_logprob")
    return ",\n    ".join([star, *extra])
