"""Stage `rollouts`: π_ref samples `rollouts.n_samples` responses per OPD prompt, keeping its own log-probs.

Output: data/rollouts/part-XXXXX.parquet (the rollout shard contract), one row per response,
with the sampling policy's per-token log-probs (the behaviour policy for importance ratios) and a
footer naming the policy, tokenizer, backend and settings. A part holds the samples of a fixed
slice of prompts and is seeded from (seed, part index) alone, so parts are independent units of
work: a rerun after a crash skips finished parts, `--shard i/n` lets several processes (a SLURM
array) fill one folder, process i writing the parts whose index is i modulo n, and
`rollouts.cluster.backend: ray` spreads this process's parts over a Ray Data actor pool.

With `rollouts.max_perplexity` set, responses above that perplexity are dropped (or redrawn, up to
`rollouts.resample_budget` times) before they are written, so teacher_topk never scores them
(offline_opd.backends.rejection); each part's footer and the stage's metrics count the rejected rows and
their response tokens (the teacher tokens saved).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from offline_opd.contract import shards
from offline_opd.config import RolloutsConfig
from offline_opd.backends.engine import Engine, load_engine
from offline_opd.backends.base import Sampling, batch_seed
from offline_opd.backends import pool
from offline_opd.backends.rejection import Rejections, sample_with_rejection
from offline_opd.contract.parts import PromptParts, plan_parts
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


@dataclass(frozen=True)
class RolloutWork:
    """Part j of a rollouts run, sampled and written by whichever process runs it (offline_opd.backends.pool)."""

    policy: Path
    cfg: RolloutsConfig
    plan: PromptParts
    out: Path

    @contextmanager
    def open(self) -> Iterator[Callable[[int], dict]]:
        engine = load_engine(self.policy, self.cfg, KIND, tensor_parallel=self.cfg.cluster.tensor_parallel)
        try:
            yield partial(self.part, engine)
        finally:
            engine.close()

    def part(self, engine: Engine, j: int) -> dict:
        cfg, rows, footer = self.cfg, self.plan.bounds(j), self.plan.footer
        sampling = Sampling(cfg.n_samples, cfg.temperature, cfg.max_new_tokens, seed=batch_seed(cfg.seed, j))
        rejected = {}
        if cfg.max_perplexity is None:
            samples = engine.generate(self.plan.tokens[rows], sampling)
        else:
            samples, stats = sample_with_rejection(engine.generate, self.plan.tokens[rows], sampling,
                                                   cfg.max_perplexity, cfg.resample_budget)
            rejected = dataclasses.asdict(stats)
            footer = dataclasses.replace(footer, **rejected)
        table = rollout_table(self.plan.prompt_ids[rows], self.plan.tokens[rows], samples)
        shards.write_shard(self.out / shards.part_name(j), table, footer, ROLLOUT_SCHEMA,
                           before_replace=self.plan.pending.replaced_by(j))
        flat = [s for row in samples for s in row if s is not None]
        return {"rows": len(flat), "response_tokens": sum(len(s.response_ids) for s in flat),
                "at_max_new_tokens": sum(len(s.response_ids) == cfg.max_new_tokens for s in flat), **rejected}


def run(args: argparse.Namespace, cfg: RolloutsConfig) -> dict:
    plan = plan_parts(KIND, args.policy, args.prompts, args.out, cfg,
                      per_part=max(1, cfg.rows_per_shard // cfg.n_samples), shard=args.shard, size_key="n_opd")
    stats = {"parts_total": plan.footer.num_parts, "parts_skipped": plan.skipped,
             "parts_written": 0, "rows": 0, "response_tokens": 0, "at_max_new_tokens": 0}
    if cfg.max_perplexity is not None:   # counted over the parts this run wrote
        stats.update(dataclasses.asdict(Rejections()))
    if not plan.todo:
        plan.pending.clear_stale()
        return stats
    start = time.perf_counter()
    for _, record in pool.run_units(RolloutWork(args.policy, cfg, plan, args.out), plan.todo, cfg.cluster, KIND):
        stats["parts_written"] += 1
        for key, value in record.items():
            stats[key] += value
    seconds = time.perf_counter() - start   # engine start included: with Ray the engines load in parallel
    stats["tokens_per_s"] = round(stats["response_tokens"] / max(seconds, 1e-9), 1)
    stats["mean_response_tokens"] = round(stats["response_tokens"] / max(stats["rows"], 1), 2)
    return stats


def main(argv: list[str] | None = None) -> dict:
    return stage_main(KIND, __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
