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
per position, 0.5 Σ_j |p̂_j − p_j| over the stored entries; and what a loss feels: the per-token
divergence (fkl and rkl on the entries + tail, as distill computes it) of π_ref (data/models/student_sft)
to each format's targets, as the mean |difference| to the same loss on the fp32 scores with the exact
tail, next to the mean loss itself. For `v1 fp16` that difference includes the rebuilt tail.

    PYTHONPATH=. python bench/shard_bytes.py --run /path/to/scratch/project [--ks 8 32 64] [--parts 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import torch

from opd_kernels import sparse_divergence
from offline_opd.contract import shards
from offline_opd.stages import teacher_topk
from offline_opd.backends.engine import load_engine
from offline_opd.config import EngineConfig
from offline_opd.contract.codec import Codec, TeacherFormat, make_codec

ENTRY_COLUMNS = ("topk_ids", "topk_logprobs", "topk_lpmax", "topk_lpq")
TEACHER_COLUMNS = ENTRY_COLUMNS + ("tail_logprob", "teacher_logprob")



def hf_scorer(model: Path):
    """The hf engine in fp32 on the CPU (the toy's sequences are far below this max_model_len)."""
    return load_engine(model, EngineConfig("hf", 512, "float32", 1 << 16, 1.0), "bench", device="cpu")

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


def student_logprobs(model: Path, rollouts: list[pa.Table], vocab: int) -> torch.Tensor:
    """π_ref's full log-probs [tokens, V] at every response position, in the shards' row-major order
    (the scorer with k = V returns the whole distribution, sorted: scattered back by id)."""
    scorer = hf_scorer(model)
    out = []
    for t in rollouts:
        for s in scorer.score(t["input_ids"].to_pylist(), t["prompt_len"].to_pylist(), k=vocab):
            out.append(torch.empty(s.topk_ids.shape).scatter_(1, torch.from_numpy(s.topk_ids).long(),
                                                              torch.from_numpy(s.topk_logprobs)))
    return torch.cat(out)


def token_losses(logits: torch.Tensor, dec: dict, tail: torch.Tensor | None) -> dict[str, torch.Tensor]:
    ids, lps = torch.from_numpy(dec["topk_ids"]), torch.from_numpy(dec["topk_logprobs"]).float()
    return {m: sparse_divergence(logits, ids, lps, m, tail_logprob=tail, backend="torch") for m in ("fkl", "rkl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="project holding data/rollouts and data/models/teacher")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--parts", type=int, default=None, help="score only the first N rollout parts")
    parser.add_argument("--student", type=Path, default=None, help="π_ref for the loss columns "
                                                                     "(default: RUN/data/models/student_sft)")
    args = parser.parse_args()
    parts = shards.open_run(args.run / "data/rollouts", "rollouts", shards.ROLLOUT_SCHEMA)[:args.parts]
    rollouts = [pa.concat_tables(shards.iter_row_groups(p)) for p in parts]
    scorer = hf_scorer(args.run / "data/models/teacher")
    vocab = scorer.model.config.get_text_config().vocab_size
    tokens = sum(int(np.sum(np.diff(t["input_ids"].combine_chunks().offsets.to_numpy())
                            - t["prompt_len"].to_numpy())) for t in rollouts)
    print(f"{len(rollouts)} rollout parts, {sum(t.num_rows for t in rollouts)} rows, {tokens} response tokens, "
          f"vocabulary {vocab}")
    logits = student_logprobs(args.student or args.run / "data/models/student_sft", rollouts, vocab)
    print(f"{'k':>3} {'format':<11} {'entry B':>8} {'token B':>8} {'file B':>8} {'vs v1':>6} "
          f"{'max |dlp|':>10} {'mean TV':>10} {'fkl':>8} {'|dfkl|':>9} {'rkl':>8} {'|drkl|':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            scored = [scorer.score(t["input_ids"].to_pylist(), t["prompt_len"].to_pylist(), k=k) for t in rollouts]
            exact = np.concatenate([s.topk_logprobs for part in scored for s in part])
            exact_ids = np.concatenate([s.topk_ids for part in scored for s in part])
            exact_tail = torch.from_numpy(np.concatenate([s.tail_logprob for part in scored for s in part]))
            ref = token_losses(logits, {"topk_ids": exact_ids, "topk_logprobs": exact}, exact_tail)
            baseline = None
            for name, fmt in formats(k, vocab).items():
                size, cols = 0, {}
                decoded, tails = [], []
                for j, (table, part) in enumerate(zip(rollouts, scored)):
                    path = shards.write_shard(Path(tmp) / shards.part_name(j),
                                              teacher_topk.scored_table(table, part, fmt), {"kind": "teacher_topk"},
                                              shards.teacher_schema(fmt))
                    size += path.stat().st_size
                    for c, b in column_bytes(path).items():
                        cols[c] = cols.get(c, 0) + b
                    dec = fmt.decode(pq.read_table(path))
                    decoded.append(dec["topk_logprobs"])
                    tails.append(dec["tail_logprob"])
                got = np.concatenate(decoded).astype(np.float64)
                tail = None if tails[0] is None else torch.from_numpy(np.concatenate(tails))
                loss = token_losses(logits, {"topk_ids": exact_ids, "topk_logprobs": got.astype(np.float32)}, tail)
                err = np.abs(got - exact)
                tv = 0.5 * np.abs(np.exp(got) - np.exp(exact)).sum(1)
                entry = sum(cols.get(c, 0) for c in ENTRY_COLUMNS)
                teacher = sum(cols.get(c, 0) for c in TEACHER_COLUMNS)
                baseline = baseline or teacher
                print(f"{k:>3} {name:<11} {entry / (tokens * k):>8.3f} {teacher / tokens:>8.3f} {size / tokens:>8.2f} "
                      f"{teacher / baseline:>6.2f} {err.max():>10.2e} {tv.mean():>10.2e}"
                      + "".join(f" {float(loss[m].mean()):>8.4f} {float((loss[m] - ref[m]).abs().mean()):>9.2e}"
                                for m in ("fkl", "rkl")))


if __name__ == "__main__":
    main()
