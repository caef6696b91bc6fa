"""How a teacher shard stores its per-position entries, and the vectorised decoding back to arrays.

Codecs (`teacher_topk.codec`, recorded as JSON in the footer key `opd.codec`; a shard without the key
is `plain`):

* `plain`: `topk_ids` list<int32>, `topk_logprobs` list<float16|float32> (`logprob_dtype`), as in v1.
* `q8` / `q16`: log-probs quantised relative to the position's largest stored log-prob: `topk_lpmax`
  (one float32 per position) and `topk_lpq` (one uint8 / uint16 code per entry),
  lp = lpmax − code · step; codes saturate at the top code, i.e. entries more than
  (2^bits − 1) · step nats below the best one are stored at that distance. q8 spans 16 nats (error
  at most 1/32 nat; entries below e^-16 ≈ 1e-7 of the best one are stored too high, which an rkl-type
  loss feels where the student puts mass on them), q16 spans 64 nats (error at most 1/2048 nat, in
  practice no saturation). Ids use the narrowest unsigned type that holds the vocabulary (`id_type`),
  with the type's largest value marking an empty slot.

Everything else (Parquet zstd on top) is left to the writer. Decoding works on whole flattened Arrow
columns with numpy (no per-token Python), so the data path decodes a batch in a few array operations;
`opd-inspect` decodes the same way in SQL (`offline_opd.tools.inspect_shards`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from offline_opd.contract.sparse_targets import entry_weights

CODECS = ("plain", "q8", "q16")
# nats per code: the span below the position's best entry divided by the number of codes.
LP_STEP = {"q8": 16.0 / 255, "q16": 64.0 / 65535}
LP_BITS = {"q8": 8, "q16": 16}
ID_TYPES = {"uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "int32": pa.int32()}


@dataclass(frozen=True)
class Codec:
    """A codec with its parameters, as recorded in the footer."""

    name: str
    logprob_dtype: str = "float16"   # plain only
    lp_step: float = 0.0             # q8 / q16: nats per code
    lp_bits: int = 0                 # q8 / q16: bits per code
    id_type: str = "int32"

    @property
    def quantised(self) -> bool:
        return self.name != "plain"

    def to_meta(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def make_codec(name: str, logprob_dtype: str, vocab: int) -> Codec:
    """The codec `name` for a teacher with `vocab` ids (the id type must also hold the empty-slot marker)."""
    if name not in CODECS:
        raise ValueError(f"codec {name!r}: use one of {', '.join(CODECS)}")
    if name == "plain":
        return Codec("plain", logprob_dtype=logprob_dtype)
    id_type = next(t for t, bound in (("uint8", 255), ("uint16", 65535), ("uint32", 2**32 - 1)) if vocab < bound)
    return Codec(name, logprob_dtype="", lp_step=LP_STEP[name], lp_bits=LP_BITS[name], id_type=id_type)


def codec_from_meta(meta: Mapping[str, str], logprob_dtype: str) -> Codec:
    """The codec a shard's footer records; shards written before codecs existed are `plain`."""
    if "codec" not in meta:
        return Codec("plain", logprob_dtype=logprob_dtype)
    return Codec(**json.loads(meta["codec"]))


def entry_fields(codec: Codec) -> list[pa.Field]:
    """The shard columns holding the entries (ids and log-probs) under `codec`."""
    if not codec.quantised:
        value = {"float16": pa.float16(), "float32": pa.float32()}[codec.logprob_dtype]
        return [pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
                pa.field("topk_logprobs", pa.list_(value), nullable=False)]
    code = {8: pa.uint8(), 16: pa.uint16()}[codec.lp_bits]
    return [pa.field("topk_ids", pa.list_(ID_TYPES[codec.id_type]), nullable=False),
            pa.field("topk_lpmax", pa.list_(pa.float32()), nullable=False),
            pa.field("topk_lpq", pa.list_(code), nullable=False)]


def per_token_widths(codec: Codec, width: int) -> dict[str, int]:
    """Values per response token in each entry column (the row-level check compares list lengths)."""
    if not codec.quantised:
        return {"topk_ids": width, "topk_logprobs": width}
    return {"topk_ids": width, "topk_lpmax": 1, "topk_lpq": width}


def encode(codec: Codec, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
    """Column values of one sequence's entries ids/logprobs [T, W] (id -1 = empty slot), flattened row-major."""
    if not codec.quantised:
        return {"topk_ids": ids.reshape(-1), "topk_logprobs": logprobs.reshape(-1)}
    valid = ids >= 0
    top = np.where(valid, logprobs, -np.inf).max(1, initial=-np.inf) if ids.shape[1] else np.zeros(len(ids))
    top = np.where(np.isfinite(top), top, 0.0).astype(np.float32)
    code_max = 2 ** codec.lp_bits - 1
    codes = np.clip(np.rint((top[:, None] - logprobs) / codec.lp_step), 0, code_max)
    empty = np.iinfo(ID_TYPES[codec.id_type].to_pandas_dtype()).max
    return {"topk_ids": np.where(valid, ids, empty).reshape(-1), "topk_lpmax": top,
            "topk_lpq": np.where(valid, codes, 0).reshape(-1)}


def decode(codec: Codec, table: pa.Table, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n, W], log-probs [n, W]) of every response token in `table`, row-major; an empty
    slot is id -1 with log-prob -inf (as the scorer writes it and the DuckDB views decode it). n is the
    number of response tokens."""
    ids = _flat(table, "topk_ids").reshape(n, width)  # n, not -1: width may be 0 (pg)
    if not codec.quantised:
        return ids.astype(np.int32), _flat(table, "topk_logprobs").reshape(n, width)
    empty = np.iinfo(ID_TYPES[codec.id_type].to_pandas_dtype()).max
    ids = np.where(ids == empty, -1, ids.astype(np.int64)).astype(np.int32)
    top = _flat(table, "topk_lpmax").astype(np.float32)
    codes = _flat(table, "topk_lpq").reshape(n, width).astype(np.float32)
    return ids, np.where(ids < 0, -np.inf, top[:, None] - codes * np.float32(codec.lp_step)).astype(np.float32)


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
        out += entry_fields(self.codec)
        if self.samples:
            out.append(pa.field("sample_counts", pa.list_(pa.uint8()), nullable=False))
        return out

    def widths(self) -> dict[str, int]:
        """Values per response token of every teacher column."""
        out = {"teacher_logprob": 1, **per_token_widths(self.codec, self.width)}
        if self.exact_tail:
            out["tail_logprob"] = 1
        if self.samples:
            out["sample_counts"] = self.width
        return out

    def decode(self, table: pa.Table) -> dict[str, np.ndarray | None]:
        """Per response token, row-major: topk_ids / topk_logprobs [n, W], tail_logprob [n] (None without
        an exact tail), entry_weights [n, W] (None unless sampled)."""
        n = len(table.column("teacher_logprob").combine_chunks().flatten())
        ids, lps = decode(self.codec, table, self.width, n)
        tail = _flat(table, "tail_logprob").astype(np.float32) if self.exact_tail else None
        weights = None
        if self.samples:
            counts = _flat(table, "sample_counts").reshape(n, self.width)
            weights = entry_weights(counts, lps, tail, self.samples)
        return {"topk_ids": ids, "topk_logprobs": lps, "tail_logprob": tail, "entry_weights": weights}


def _flat(table: pa.Table, name: str) -> np.ndarray:
    return pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
