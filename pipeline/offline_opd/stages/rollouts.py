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
import time
from pathlib import Path

from tqdm import tqdm

from offline_opd.contract import shards
from offline_opd.config import RolloutsConfig
from offline_opd.backends.engine import load_engine
from offline_opd.backends.base import Sampling, batch_seed
from offline_opd.contract.parts import plan_parts
from offline_opd.contract.tables import ROLLOUT_SCHEMA, rollout_table
from offline_opd.runtime import add_shard_arg, cli, stage_main

KIND = "rollouts"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", type=Path, required=True,
                        help="π_ref: the model folder that samples (the SFT student, data/models/student_sft)")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="OPD prompt set (Parquet with prompt_id, prompt; data/prompts/opd.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the part-XXXXX.parquet shards")
    add_shard_arg(parser)


def run(args: argparse.Namespace, cfg: RolloutsConfig) -> dict:
    plan = plan_parts(KIND, args.policy, args.prompts, args.out, cfg,
                      per_part=max(1, cfg.rows_per_shard // cfg.n_samples), shard=args.shard, size_key="n_opd")
    stats = {"parts_total": plan.footer.num_parts, "parts_skipped": plan.skipped,
             "parts_written": 0, "rows": 0, "response_tokens": 0, "at_max_new_tokens": 0}
    if not plan.todo:
        plan.pending.clear_stale()
        return stats
    engine = load_engine(args.policy, cfg, KIND)
    start = time.perf_counter()
    for j in tqdm(plan.todo, desc="rollouts", unit="part"):
        part = plan.bounds(j)
        samples = engine.generate(plan.tokens[part], Sampling(cfg.n_samples, cfg.temperature, cfg.max_new_tokens,
                                                              seed=batch_seed(cfg.seed, j)))
        table = rollout_table(plan.prompt_ids[part], plan.tokens[part], samples)
        shards.write_shard(args.out / shards.part_name(j), table, plan.footer, ROLLOUT_SCHEMA,
                           before_replace=plan.pending.clear_stale)
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
    cli(main)
