"""Bytes per stored entry and per response token of teacher shards, per codec and k, against today's format.

Scores the rollouts of a pipeline run (the embedded default's: build it with `dvc repro teacher_topk` in a
scratch copy of the repo) with its teacher once per k, then writes the same scores in every format with
the pipeline's own writer (`teacher_topk.scored_table` + `shards.write_shard`, zstd, page checksums) and
reads the compressed size of each column from the Parquet footers:

* `v1 fp16`: the format before shards v2 (int32 ids, float16 log-probs, no tail column), the baseline;
* `plain fp16` / `plain fp32`: v2 without a codec (the v1 columns plus the exact fp32 tail per token);
* `q16` / `q8`: log-probs quantised relative to the position's best entry, ids in the narrowest type.

entry B = bytes of the entry columns (ids, log-probs, per-position maxima) / stored entries;
token B = bytes of all teacher columns (entries, tail, sampled-token log-prob) / response tokens;
file B = whole file (rollout columns and footer included) / response tokens.
It also prints each format's error against the fp32 scores: the largest absolute log-prob error over all
entries (saturated q8/q16 codes, 16 nats below the best entry, dominate it) and the mean total variation
per position, 0.5 Σ_j |p̂_j − p_j| over the stored entries (what a loss actually feels).

    PYTHONPATH=. python bench/shard_bytes.py --run /path/to/scratch/project [--ks 8 32 64] [--parts 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards, teacher_topk
from pipeline.scoring import HFScorer
from pipeline.shard_codec import Codec, TeacherFormat, make_codec

ENTRY_COLUMNS = ("topk_ids", "topk_logprobs", "topk_lpmax", "topk_lpq")
TEACHER_COLUMNS = ENTRY_COLUMNS + ("tail_logprob", "teacher_logprob")


def formats(k: int, vocab: int) -> dict[str, TeacherFormat]:
    v2 = {f"plain {d[5:]}": make_codec("plain", d, vocab) for d in ("float16", "float32")}
    v2 |= {name: make_codec(name, "", vocab) for name in ("q16", "q8")}
    return {"v1 fp16": TeacherFormat(Codec("plain", logprob_dtype="float16"), k, 0, exact_tail=False),
            **{name: TeacherFormat(codec, k, 0, exact_tail=True) for name, codec in v2.items()}}


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over row groups (from the footer)."""
    meta = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="project holding data/rollouts and data/models/teacher")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--parts", type=int, default=None, help="score only the first N rollout parts")
    args = parser.parse_args()
    parts = shards.open_run(args.run / "data/rollouts", "rollouts", shards.ROLLOUT_SCHEMA)[:args.parts]
    rollouts = [pa.concat_tables(shards.iter_row_groups(p)) for p in parts]
    scorer = HFScorer(args.run / "data/models/teacher", batch_size=512, device="cpu")
    vocab = scorer.model.config.get_text_config().vocab_size
    tokens = sum(int(np.sum(np.diff(t["input_ids"].combine_chunks().offsets.to_numpy())
                            - t["prompt_len"].to_numpy())) for t in rollouts)
    print(f"{len(rollouts)} rollout parts, {sum(t.num_rows for t in rollouts)} rows, {tokens} response tokens, "
          f"vocabulary {vocab}")
    print(f"{'k':>3} {'format':<11} {'entry B':>8} {'token B':>8} {'file B':>8} {'vs v1':>6} "
          f"{'max |dlp|':>10} {'mean TV':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            scored = [scorer.score(t["input_ids"].to_pylist(), t["prompt_len"].to_pylist(), k=k) for t in rollouts]
            exact = np.concatenate([s.topk_logprobs for part in scored for s in part])
            baseline = None
            for name, fmt in formats(k, vocab).items():
                size, cols = 0, {}
                decoded = []
                for j, (table, part) in enumerate(zip(rollouts, scored)):
                    path = shards.write_shard(Path(tmp) / shards.part_name(j),
                                              teacher_topk.scored_table(table, part, fmt), {"kind": "teacher_topk"},
                                              shards.teacher_schema(fmt))
                    size += path.stat().st_size
                    for c, b in column_bytes(path).items():
                        cols[c] = cols.get(c, 0) + b
                    decoded.append(fmt.decode(pq.read_table(path))["topk_logprobs"])
                got = np.concatenate(decoded).astype(np.float64)
                err = np.abs(got - exact)
                tv = 0.5 * np.abs(np.exp(got) - np.exp(exact)).sum(1)
                entry = sum(cols.get(c, 0) for c in ENTRY_COLUMNS)
                teacher = sum(cols.get(c, 0) for c in TEACHER_COLUMNS)
                baseline = baseline or teacher
                print(f"{k:>3} {name:<11} {entry / (tokens * k):>8.3f} {teacher / tokens:>8.3f} {size / tokens:>8.2f} "
                      f"{teacher / baseline:>6.2f} {err.max():>10.2e} {tv.mean():>10.2e}")


if __name__ == "__main__":
    main()
