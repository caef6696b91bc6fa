"""How a teacher shard stores its per-position entries: encoding, numpy decoding, DuckDB decoding, error bounds.

Codecs (`teacher_topk.codec`, recorded as JSON in the footer key `opd.codec` with its name, version and
parameters; a shard without the key is `plain`). lp is a stored log-prob, lp̂ its decoded value, top the
position's largest stored log-prob, d = top − lp ≥ 0 the distance below it:

* `plain`: `topk_ids` list<int32> (-1: empty slot), `topk_logprobs` list<float16|float32> (`logprob_dtype`).
  |lp̂ − lp| ≤ 2^-11 |lp| + 2^-25 in float16 (0 in float32: the scorer's own values).
* `q8` / `q16`: ids in the narrowest unsigned type that holds the vocabulary and the empty-slot marker (the
  type's largest value), `topk_lpmax` (top, float32, one per position) and `topk_lpq` (one uint8 / uint16
  code per entry): lp̂ = top − code · step, step = 16/255 (q8) or 64/65535 (q16) nats. Within the span
  (d ≤ 16 or 64 nats) |lp̂ − lp| ≤ step/2 + 2^-24 |lp̂| (the last term: one float32 rounding); an entry
  further below is stored at the span (saturated: too high, never too low).
* `compact` (for large vocabularies: 1.5–1.8 bytes per entry at 49k and 152k ids, bench/shard_bytes.py):
  the entries of a position are stored in ascending id order, valid ids first. `topk_id_delta`
  list<uint32> holds each id minus the previous one of its position (the first: the id itself; empty
  slots: 0); `topk_lp_code` list<uint8> one log-companded code per entry, c = round(log(1 + d/d0) / s),
  d̂ = d0 (e^{c s} − 1), so the step grows with the distance (fine where the mass is, coarse far below
  it), and code 255 marks an empty slot; `topk_lp_top` list<uint32> the position's top as
  round(−top · 2^12). |lp̂ − lp| ≤ (e^{s/2} − 1)(d0 + d̂) + 2^-24 |lp̂| up to code 254, d̂ = 204 nats;
  entries further below are stored there (saturated: too high, never too low). With d0 = 0.1 and
  s = 0.03: 0.0015 nats at the top, 0.017 one nat below it, 0.15 ten nats below it. Its columns are
  written with Parquet's BYTE_STREAM_SPLIT encoding, so zstd compresses each byte plane of the ids on its
  own. Entries are not in descending log-prob order (no consumer needs that: the losses sum over entries).

Decoding works on whole flattened Arrow columns with numpy (no per-token Python), so the data path decodes
a batch in a few array operations; `sql_columns` is the same decoding as DuckDB expressions, used by the
`shards` view of `opd-inspect` and tested against `decode` on the same shards (tests/test_inspect.py).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from offline_opd.contract.sparse_targets import TAIL_FLOOR

CODECS = ("plain", "q8", "q16", "compact")
FP32_ROUNDING = 2.0 ** -24   # relative error of one rounding to float32
BYTE_STREAM_SPLIT = "BYTE_STREAM_SPLIT"


class Codec(ABC):
    """A codec with its parameters, as recorded in the footer (`to_meta`, `codec_from_meta`)."""

    name: ClassVar[str]
    version: ClassVar[int] = 1

    def describe(self) -> dict:
        """Name, version and parameters: the footer's `opd.codec`, from which `codec_from_meta` rebuilds it."""
        return dict(sorted({"name": self.name, "version": self.version, **asdict(self)}.items()))

    def to_meta(self) -> str:
        return json.dumps(self.describe())

    @abstractmethod
    def fields(self) -> list[pa.Field]:
        """The shard columns holding the entries (ids and log-probs)."""

    @abstractmethod
    def widths(self, width: int) -> dict[str, int]:
        """Values per response token in each entry column (the row-level check compares list lengths)."""

    def encodings(self) -> dict[str, str]:
        """Parquet encodings of the entry columns that differ from the writer's default (plain + zstd)."""
        return {}

    @abstractmethod
    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Column values of one sequence's entries ids/logprobs [T, W] (id -1 = empty slot), flattened
        row-major, and the order [T, W] the entries are stored in (None: as given), for other per-entry
        columns (`sample_counts`) to follow."""

    @abstractmethod
    def decode(self, table: pa.Table, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n, W], log-probs float32 [n, W]) of every response token in `table`, row-major; an empty
        slot is id -1 with log-prob -inf (as the scorer writes it). n is the number of response tokens."""

    @abstractmethod
    def sql_columns(self, width: int) -> dict[str, str]:
        """DuckDB expressions over the stored columns that decode `topk_ids` (INTEGER[]) and `topk_logprobs`
        (FLOAT[]) exactly as `decode` does; the stored entry columns are then left out of the view."""

    @abstractmethod
    def error_bound(self, decoded: np.ndarray, top: np.ndarray) -> np.ndarray:
        """The largest |decoded − stored| log-prob this codec allows per entry, from the decoded values [n, W]
        and the positions' decoded largest entry [n] (inf where the codec saturates)."""


@dataclass(frozen=True)
class Plain(Codec):
    """Ids as int32, log-probs as float16 or float32."""

    name: ClassVar[str] = "plain"
    logprob_dtype: str = "float16"

    def fields(self) -> list[pa.Field]:
        value = {"float16": pa.float16(), "float32": pa.float32()}[self.logprob_dtype]
        return [pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
                pa.field("topk_logprobs", pa.list_(value), nullable=False)]

    def widths(self, width: int) -> dict[str, int]:
        return {"topk_ids": width, "topk_logprobs": width}

    def encode(self, ids, logprobs):
        return {"topk_ids": ids.reshape(-1), "topk_logprobs": logprobs.reshape(-1)}, None

    def decode(self, table, width, n):
        ids = flat(table, "topk_ids").reshape(n, width)  # n, not -1: width may be 0 (pg)
        return ids.astype(np.int32), flat(table, "topk_logprobs").reshape(n, width)

    def sql_columns(self, width):
        return {}

    def error_bound(self, decoded, top):
        if self.logprob_dtype == "float32":
            return np.zeros(decoded.shape)
        return 2.0 ** -11 * np.abs(decoded.astype(np.float64)) + 2.0 ** -25  # half an ulp; subnormals below 6e-5


@dataclass(frozen=True)
class Quantised(Codec):
    """q8 / q16: codes of the distance below the position's best entry, on a uniform grid."""

    name: str = "q8"
    lp_step: float = 16.0 / 255   # nats per code: the span below the position's best entry / number of codes
    lp_bits: int = 8
    id_type: str = "uint8"

    @property
    def code_max(self) -> int:
        return 2 ** self.lp_bits - 1

    @property
    def empty(self) -> int:
        """The id type's largest value: the empty-slot marker."""
        return {"uint8": 2 ** 8, "uint16": 2 ** 16, "uint32": 2 ** 32}[self.id_type] - 1

    def describe(self) -> dict:  # `name` is a field here (q8 or q16), not a class constant
        return dict(sorted({"version": self.version, **asdict(self)}.items()))

    def fields(self) -> list[pa.Field]:
        code = {8: pa.uint8(), 16: pa.uint16()}[self.lp_bits]
        return [pa.field("topk_ids", pa.list_(ID_TYPES[self.id_type]), nullable=False),
                pa.field("topk_lpmax", pa.list_(pa.float32()), nullable=False),
                pa.field("topk_lpq", pa.list_(code), nullable=False)]

    def widths(self, width: int) -> dict[str, int]:
        return {"topk_ids": width, "topk_lpmax": 1, "topk_lpq": width}

    def encode(self, ids, logprobs):
        valid = ids >= 0
        top = position_top(valid, logprobs).astype(np.float32)
        # float64, so that the code is the nearest one to the float32 values (float32 math was off by 3e-6)
        dist = (top.astype(np.float64)[:, None] - logprobs.astype(np.float64)) / self.lp_step
        codes = np.clip(np.rint(np.nan_to_num(dist, posinf=self.code_max)), 0, self.code_max)
        return {"topk_ids": np.where(valid, ids, self.empty).reshape(-1), "topk_lpmax": top,
                "topk_lpq": np.where(valid, codes, 0).reshape(-1)}, None

    def decode(self, table, width, n):
        ids = flat(table, "topk_ids").reshape(n, width)
        ids = np.where(ids == self.empty, -1, ids.astype(np.int64)).astype(np.int32)
        top = flat(table, "topk_lpmax").astype(np.float64)
        codes = flat(table, "topk_lpq").reshape(n, width).astype(np.float64)
        lps = (top[:, None] - codes * self.lp_step).astype(np.float32)  # one rounding, as in SQL below
        return ids, np.where(ids < 0, np.float32(-np.inf), lps)

    def sql_columns(self, width):
        w, empty = max(width, 1), self.empty
        return {
            "topk_ids": f"list_transform(topk_ids, lambda x: CASE WHEN x = {empty} THEN -1 ELSE x::INTEGER END)",
            "topk_logprobs": f"list_transform(topk_lpq, lambda c, i: CASE WHEN topk_ids[i] = {empty} "
                             f"THEN '-inf'::FLOAT\n      ELSE (topk_lpmax[(i - 1) // {w} + 1]::DOUBLE - "
                             f"c::DOUBLE * {_sql_double(self.lp_step)})::FLOAT END)",
        }

    def error_bound(self, decoded, top):
        d = top.astype(np.float64)[:, None] - decoded.astype(np.float64)
        saturated = d >= self.code_max * self.lp_step - self.lp_step / 4
        bound = self.lp_step / 2 + FP32_ROUNDING * np.abs(decoded.astype(np.float64))
        return np.where(saturated, np.inf, bound)


@dataclass(frozen=True)
class Compact(Codec):
    """Ids sorted and delta-coded within a position, log-companded 8-bit codes (module docstring)."""

    name: ClassVar[str] = "compact"
    lp_knee: float = 0.1           # d0 (nats): where the code's step starts to grow with the distance
    lp_scale: float = 0.03         # s: code c stands for d0 (e^{c s} - 1) nats below the position's top
    top_scale: int = 4096          # the top is stored as round(-top * top_scale)

    EMPTY: ClassVar[int] = 255

    def fields(self) -> list[pa.Field]:
        return [pa.field("topk_id_delta", pa.list_(pa.uint32()), nullable=False),
                pa.field("topk_lp_code", pa.list_(pa.uint8()), nullable=False),
                pa.field("topk_lp_top", pa.list_(pa.uint32()), nullable=False)]

    def widths(self, width: int) -> dict[str, int]:
        return {"topk_id_delta": width, "topk_lp_code": width, "topk_lp_top": 1}

    def encodings(self) -> dict[str, str]:
        return {f.name: BYTE_STREAM_SPLIT for f in self.fields()}

    def distances(self) -> np.ndarray:
        """d̂ of every code 0..254 (float64): the decoding table."""
        return self.lp_knee * (np.exp(np.arange(self.EMPTY) * self.lp_scale) - 1.0)

    def encode(self, ids, logprobs):
        valid = ids >= 0
        # valid ids ascending, empty slots last: sort on (empty, id)
        order = np.lexsort((np.where(valid, ids, 0), ~valid), axis=-1) if ids.size else np.zeros(ids.shape, int)
        ids_s = np.take_along_axis(ids, order, 1).astype(np.int64)
        lp_s = np.take_along_axis(logprobs, order, 1).astype(np.float64)
        valid_s = ids_s >= 0
        top_q = np.rint(np.clip(-position_top(valid, logprobs).astype(np.float64), 0, -TAIL_FLOOR) * self.top_scale)
        top = -top_q / self.top_scale
        dist = np.maximum(top[:, None] - np.maximum(lp_s, TAIL_FLOOR), 0.0)
        codes = np.clip(np.rint(np.log1p(dist / self.lp_knee) / self.lp_scale), 0, self.EMPTY - 1)
        delta = np.diff(np.where(valid_s, ids_s, 0), axis=1, prepend=0)
        return {"topk_id_delta": np.where(valid_s, delta, 0).reshape(-1),
                "topk_lp_code": np.where(valid_s, codes, self.EMPTY).reshape(-1),
                "topk_lp_top": top_q.astype(np.uint32)}, order

    def decode(self, table, width, n):
        codes = flat(table, "topk_lp_code").reshape(n, width)
        empty = codes == self.EMPTY
        ids = np.cumsum(flat(table, "topk_id_delta").reshape(n, width).astype(np.int64), axis=1)
        top = flat(table, "topk_lp_top").astype(np.float64) / -self.top_scale
        table_d = np.append(self.distances(), np.inf)  # code 255: empty, -inf
        lps = (top[:, None] - table_d[codes]).astype(np.float32)
        return np.where(empty, -1, ids).astype(np.int32), lps

    def sql_columns(self, width):
        w = max(width, 1)
        top = f"topk_lp_top[(i - 1) // {w} + 1]::DOUBLE / {_sql_double(-self.top_scale)}"
        dist = f"{_sql_double(self.lp_knee)} * (exp(c::DOUBLE * {_sql_double(self.lp_scale)}) - 1.0::DOUBLE)"
        return {
            "topk_ids": f"list_transform(topk_lp_code, lambda c, i: CASE WHEN c = {self.EMPTY} THEN -1\n"
                        f"      ELSE list_sum(topk_id_delta[(i - 1) // {w} * {w} + 1 : i])::INTEGER END)",
            "topk_logprobs": f"list_transform(topk_lp_code, lambda c, i: CASE WHEN c = {self.EMPTY} "
                             f"THEN '-inf'::FLOAT\n      ELSE ({top}\n            - {dist})::FLOAT END)",
        }

    def error_bound(self, decoded, top):
        d = np.maximum(top.astype(np.float64)[:, None] - decoded.astype(np.float64), 0.0)
        bound = (math.exp(self.lp_scale / 2) - 1.0) * (self.lp_knee + d) + FP32_ROUNDING * np.abs(decoded)
        saturated = d >= self.distances()[-1] * (1 - 1e-6)
        return np.where(saturated, np.inf, bound)


ID_TYPES = {"uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "int32": pa.int32()}
LP_STEP = {"q8": 16.0 / 255, "q16": 64.0 / 65535}


def make_codec(name: str, logprob_dtype: str, vocab: int) -> Codec:
    """The codec `name` for a teacher with `vocab` ids (q8/q16: the id type must also hold the empty-slot marker)."""
    if name not in CODECS:
        raise ValueError(f"codec {name!r}: use one of {', '.join(CODECS)}")
    if name == "plain":
        return Plain(logprob_dtype)
    if name == "compact":
        return Compact()
    id_type = next(t for t, bound in (("uint8", 255), ("uint16", 65535), ("uint32", 2**32 - 1)) if vocab < bound)
    return Quantised(name, LP_STEP[name], {"q8": 8, "q16": 16}[name], id_type)


def codec_from_meta(meta: Mapping[str, str], logprob_dtype: str) -> Codec:
    """The codec a shard's footer records; shards written before codecs existed are `plain`.

    Footers written before codecs had versions (schema v2) carry every codec's keys; each codec takes its own.
    """
    if "codec" not in meta:
        return Plain(logprob_dtype)
    desc = json.loads(meta["codec"])
    name, version = desc.pop("name"), desc.pop("version", 1)
    kind = {"plain": Plain, "q8": Quantised, "q16": Quantised, "compact": Compact}.get(name)
    if kind is None or version > kind.version:
        raise ValueError(f"codec {name!r} version {version}: this code reads {', '.join(CODECS)} up to their "
                         f"current versions; update the pipeline or rerun `teacher_topk`")
    known = set(kind.__dataclass_fields__)
    return kind(**({"name": name} if kind is Quantised else {}),
                **{k: v for k, v in desc.items() if k in known and k != "name"})


def position_top(valid: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """The largest stored log-prob of each position [T] (0 where the position stores nothing)."""
    if not valid.shape[1]:
        return np.zeros(len(valid))
    top = np.where(valid, logprobs, -np.inf).max(1)
    return np.where(np.isfinite(top), top, 0.0)


def flat(table: pa.Table, name: str) -> np.ndarray:
    """A list column's values, flattened, as numpy."""
    return pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)


def _sql_double(x: float) -> str:
    """A DuckDB DOUBLE literal: a bare decimal literal is a DECIMAL, whose products overflow (code x step)."""
    return f"{float(x)!r}::DOUBLE"
