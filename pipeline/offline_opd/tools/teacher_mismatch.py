"""Measure how far apart two teachers are on the rollouts distill trains on (Lightning OPD's σ_Δ).

Offline OPD trains on rollouts of π_ref scored by one teacher; if π_ref was fine-tuned on another
teacher's answers, the gradient carries a bias bounded by σ_Δ, the root mean square over sequences
of Σ_t |log p_A(y_t) − log p_B(y_t)| on those rollouts. This scores the same rollout tokens with
both teachers (one model in memory at a time) and reports σ_Δ, the per-token mean of |Δ| and the
counts, so a user can tell whether swapping teachers is harmless before deciding to rerun.

    python -m offline_opd.tools.teacher_mismatch --teacher-a data/models/teacher --teacher-b other/teacher \\
        --rollouts data/rollouts --max-rows 512 --out metrics/teacher_mismatch.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from offline_opd.contract import shards
from offline_opd.contract.footers import RolloutsFooter
from offline_opd.contract.tables import ROLLOUT_SCHEMA
from offline_opd.atomic import write_json
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.errors import UserError

log = logging.getLogger("opd.teacher_mismatch")


def mismatch_stats(logprobs_a: list[np.ndarray], logprobs_b: list[np.ndarray]) -> dict:
    """σ_Δ = sqrt(mean_i (Σ_t |a_it − b_it|)²) over sequences i, and mean |a − b| over all tokens."""
    lengths = np.array([len(a) for a in logprobs_a], dtype=np.int64)
    if [len(b) for b in logprobs_b] != lengths.tolist():
        raise ValueError("the two teachers scored different numbers of tokens per sequence")
    if lengths.size == 0:
        raise ValueError("no sequences to compare")
    diff = np.abs(np.concatenate(logprobs_a).astype(np.float64) - np.concatenate(logprobs_b).astype(np.float64))
    per_seq = np.bincount(np.repeat(np.arange(lengths.size), lengths), weights=diff, minlength=lengths.size)
    tokens = int(lengths.sum())
    return {
        "sigma_delta": float(np.sqrt(np.mean(per_seq ** 2))),
        "mean_abs_delta_per_token": float(diff.sum() / tokens) if tokens else 0.0,
        "mean_seq_abs_delta": float(per_seq.mean()),
        "max_seq_abs_delta": float(per_seq.max()),
        "sequences": int(lengths.size),
        "tokens": tokens,
    }


def read_rollouts(folder: Path, max_rows: int | None) -> tuple[pa.Table, RolloutsFooter]:
    """The first `max_rows` rollout rows (ids only) and the first shard's footer."""
    parts = shards.run_parts(folder, "rollouts")   # a stray .parquet beside the parts is refused, as distill does
    if not parts:
        raise UserError(f"{folder}: no part-*.parquet rollout shards; run `dvc repro rollouts`")
    tables, meta, rows = [], None, 0
    for path in parts:
        info = shards.open_shard(path, "rollouts", ROLLOUT_SCHEMA)
        meta = meta or info.footer
        for group in shards.iter_row_groups(info, ["sample_id", "input_ids", "prompt_len"]):
            tables.append(group)
            rows += group.num_rows
            if max_rows is not None and rows >= max_rows:
                return pa.concat_tables(tables).slice(0, max_rows), meta
    return pa.concat_tables(tables), meta


KV_CACHE_GIB = 2.0  # vLLM's KV cache for this one-off tool (prefill only: small)


def score_sampled(teacher: Path, input_ids: list[list[int]], prompt_lens: list[int], backend: str,
                  batch_size: int, device: str | None) -> list[np.ndarray]:
    """Log-probs of the sampled response tokens under `teacher`; the model is freed before returning."""
    from offline_opd.backends.engine import load_engine
    from offline_opd.config import EngineConfig

    longest = max(len(s) for s in input_ids)
    engine = load_engine(teacher, EngineConfig(backend, batch_size, "auto", longest, KV_CACHE_GIB), "teacher_mismatch",
                         device=device)
    out = [s.teacher_logprob for s in engine.score(input_ids, prompt_lens, k=0)]
    del engine
    gc.collect()
    return out


def measure(teacher_a: Path, teacher_b: Path, rollouts: Path, max_rows: int | None, backend: str,
            batch_size: int, device: str | None) -> dict:
    tok = {"teacher_a": tokenizer_fingerprint(teacher_a), "teacher_b": tokenizer_fingerprint(teacher_b)}
    table, meta = read_rollouts(rollouts, max_rows)
    tok["rollouts"] = meta.tokenizer_fingerprint
    if len(set(tok.values())) > 1:
        raise UserError(f"tokenizers differ: {teacher_a} {tok['teacher_a']}, {teacher_b} {tok['teacher_b']}, "
                        f"{rollouts} (footer opd.tokenizer_fingerprint) {tok['rollouts']}; log-probs of the same "
                        f"token ids are only comparable under one tokenizer")
    ids, lens = table.column("input_ids").to_pylist(), table.column("prompt_len").to_pylist()
    lp_a = score_sampled(teacher_a, ids, lens, backend, batch_size, device)
    lp_b = score_sampled(teacher_b, ids, lens, backend, batch_size, device)
    return {
        **mismatch_stats(lp_a, lp_b),
        "teacher_a": str(teacher_a), "teacher_a_fingerprint": model_fingerprint(teacher_a),
        "teacher_b": str(teacher_b), "teacher_b_fingerprint": model_fingerprint(teacher_b),
        "rollouts": str(rollouts), "policy_fingerprint": meta.policy_fingerprint,
        "tokenizer_fingerprint": tok["rollouts"], "backend": backend,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m offline_opd.tools.teacher_mismatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-a", type=Path, required=True, help="model folder of one teacher")
    parser.add_argument("--teacher-b", type=Path, required=True, help="model folder of the other teacher")
    parser.add_argument("--rollouts", type=Path, default=Path("data/rollouts"),
                        help="rollout shards sampled by π_ref (default data/rollouts)")
    parser.add_argument("--max-rows", type=int, default=None, help="score only the first N rollouts")
    parser.add_argument("--out", type=Path, default=Path("metrics/teacher_mismatch.json"),
                        help="where to write the report (default metrics/teacher_mismatch.json)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="scoring backend (default hf)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per scoring batch (default 64)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.max_rows is not None and args.max_rows < 1:
        parser.error("--max-rows must be at least 1")
    try:
        report = measure(args.teacher_a, args.teacher_b, args.rollouts, args.max_rows, args.backend,
                         args.batch_size, args.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("sigma_delta", "mean_abs_delta_per_token", "sequences", "tokens")}))
    return report


if __name__ == "__main__":
    main()
