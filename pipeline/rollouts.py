"""Stage `rollouts`: π_ref samples `rollouts.n_samples` responses per OPD prompt, keeping its own log-probs.

Output: data/rollouts/part-XXXXX.parquet (the rollout shard contract), one row per response,
with the sampling policy's per-token log-probs (the behaviour policy for importance ratios) and a
footer naming the policy, tokenizer, backend and settings. A part holds the samples of a fixed
slice of prompts and is seeded from (seed, part index) alone, so parts are independent units of
work: a rerun after a crash skips finished parts, and `--shard i/n` lets several processes (a SLURM
array) fill one folder, process i writing the parts whose index is i modulo n.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from pipeline import shards
from pipeline.config import RolloutsConfig
from pipeline.fingerprint import model_fingerprint, tokenizer_fingerprint
from pipeline.generation import Sample, backend_version, batch_seed, get_generator
from pipeline.models import load_tokenizer
from pipeline.prompts import encode_prompt, read_prompts
from pipeline.errors import UserError
from pipeline.stage import add_shard_arg, stage_main

KIND = "rollouts"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", type=Path, required=True,
                        help="π_ref: the model folder that samples (the SFT student, data/models/student_sft)")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="OPD prompt set (Parquet with prompt_id, prompt; data/prompts/opd.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the part-XXXXX.parquet shards")
    add_shard_arg(parser)


def rollout_table(prompt_ids: list[str], prompt_tokens: list[list[int]], samples: list[list[Sample]]) -> pa.Table:
    """Rows of one part: sample i of prompt p is `p#i`; input_ids are prompt + response, as π_ref saw them."""
    rows = [(pid, i, ids, s) for pid, ids, row in zip(prompt_ids, prompt_tokens, samples) for i, s in enumerate(row)]
    return pa.table({
        "sample_id": [f"{pid}#{i}" for pid, i, _, _ in rows],
        "prompt_id": [pid for pid, _, _, _ in rows],
        "input_ids": pa.array([ids + s.response_ids for _, _, ids, s in rows], pa.list_(pa.int32())),
        "prompt_len": pa.array([len(ids) for _, _, ids, _ in rows], pa.int32()),
        "student_logprobs": pa.array([s.logprobs for _, _, _, s in rows], pa.list_(pa.float32())),
    })


def run(args: argparse.Namespace, cfg: RolloutsConfig) -> dict:
    shard = args.shard
    if cfg.n_samples < 1 or cfg.rows_per_shard < 1:
        raise UserError(f"{args.params}: rollouts.n_samples and rollouts.rows_per_shard must be >= 1 "
                        f"(got {cfg.n_samples}, {cfg.rows_per_shard})")
    prompts = read_prompts(args.prompts)
    if prompts.num_rows == 0:
        raise UserError(f"{args.prompts}: no prompts; rerun `dvc repro prepare` with task.n_opd > 0")
    prompt_ids, texts = prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()
    tokenizer = load_tokenizer(args.policy)
    tokens = [encode_prompt(tokenizer, t) for t in texts]
    policy_fp = model_fingerprint(args.policy)
    digest = hashlib.sha256(json.dumps([prompt_ids, texts]).encode()).hexdigest()
    key = shards.make_run_key(config=asdict(cfg), policy=policy_fp, prompts=digest)
    per_part = max(1, cfg.rows_per_shard // cfg.n_samples)   # whole prompts per part
    n_parts = math.ceil(len(tokens) / per_part)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = shards.pending_parts(args.out, KIND, key, n_parts, shard)
    meta = {
        "kind": KIND, "run_key": key, "num_parts": n_parts,
        "policy_fingerprint": policy_fp, "tokenizer_fingerprint": tokenizer_fingerprint(args.policy),
        "policy_path": str(args.policy), "prompts_path": str(args.prompts),
        "sampling_temperature": cfg.temperature, "backend": cfg.backend,
        "backend_version": backend_version(cfg.backend), "config": asdict(cfg),
    }
    stats = {"parts_total": n_parts, "parts_skipped": len(range(shard[0], n_parts, shard[1])) - len(todo),
             "parts_written": 0, "rows": 0, "response_tokens": 0, "at_max_new_tokens": 0}
    if not todo:
        return stats
    generator = get_generator(cfg.backend, args.policy, batch_size=cfg.batch_size)
    start = time.perf_counter()
    for j in tqdm(todo, desc="rollouts", unit="part"):
        lo, hi = j * per_part, min((j + 1) * per_part, len(tokens))
        samples = generator.generate(tokens[lo:hi], cfg.n_samples, cfg.temperature, cfg.max_new_tokens,
                                     seed=batch_seed(cfg.seed, j))
        table = rollout_table(prompt_ids[lo:hi], tokens[lo:hi], samples)
        shards.write_shard(args.out / shards.part_name(j), table, meta, shards.ROLLOUT_SCHEMA)
        flat = [s for row in samples for s in row]
        stats["parts_written"] += 1
        stats["rows"] += len(flat)
        stats["response_tokens"] += sum(len(s.response_ids) for s in flat)
        stats["at_max_new_tokens"] += sum(len(s.response_ids) == cfg.max_new_tokens for s in flat)
    seconds = time.perf_counter() - start
    stats["tokens_per_s"] = round(stats["response_tokens"] / max(seconds, 1e-9), 1)
    stats["mean_response_tokens"] = round(stats["response_tokens"] / max(stats["rows"], 1), 2)
    return stats


def main(argv: list[str] | None = None) -> dict:
    return stage_main(KIND, __doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
