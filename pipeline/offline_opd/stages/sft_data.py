"""Stage `sft_data`: the teacher answers the SFT prompts; π_ref is then fine-tuned on exactly these answers.

This is what ties SFT to the teacher (docs/design.md §5): every part's footer records the teacher's and the
tokenizer's fingerprints, so `sft` and `distill` can prove later that the teacher scoring the rollouts
is the one that wrote this data. Output: data/sft/part-XXXXX.parquet (prompt_id, prompt, response,
input_ids = prompt + response ids, prompt_len), `sft_data.rows_per_shard` prompts per part. Decoding is
greedy with `sft_data.temperature: 0`, else sampled with seeds from (seed, part index), so parts are
independent: a rerun skips finished parts, and `--shard i/n` lets n processes fill one folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from offline_opd.contract import shards
from offline_opd.config import SftDataConfig
from offline_opd.backends.engine import load_engine
from offline_opd.backends.base import Sampling, batch_seed
from offline_opd.contract.parts import plan_parts
from offline_opd.contract.tables import SFT_SCHEMA, sft_table
from offline_opd.runtime import add_shard_arg, cli, stage_main

KIND = "sft_data"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model folder (data/models/teacher)")
    parser.add_argument("--prompts", type=Path, required=True, help="SFT prompt set (data/prompts/sft.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the part-XXXXX.parquet shards (data/sft)")
    add_shard_arg(parser)


def run(args: argparse.Namespace, cfg: SftDataConfig) -> dict:
    plan = plan_parts(KIND, args.teacher, args.prompts, args.out, cfg,
                      per_part=cfg.rows_per_shard, shard=args.shard, size_key="n_sft")
    stats = {"parts_total": plan.footer.num_parts, "parts_written": 0, "rows": 0, "response_tokens": 0,
             "at_max_new_tokens": 0}
    if not plan.todo:
        plan.pending.clear_stale()
        return stats
    engine = load_engine(args.teacher, cfg, KIND)
    for j in tqdm(plan.todo, desc="sft_data", unit="part"):
        rows = plan.bounds(j)
        sampling = Sampling(1, cfg.temperature, cfg.max_new_tokens, seed=batch_seed(cfg.seed, j))
        samples = [row[0] for row in engine.generate(plan.tokens[rows], sampling)]
        part = sft_table(plan.prompt_ids[rows], plan.texts[rows], plan.tokens[rows], samples, plan.tokenizer)
        shards.write_shard(args.out / shards.part_name(j), part, plan.footer, SFT_SCHEMA,
                           before_replace=plan.pending.clear_stale)
        stats["parts_written"] += 1
        stats["rows"] += len(samples)
        stats["response_tokens"] += sum(len(s.response_ids) for s in samples)
        stats["at_max_new_tokens"] += sum(len(s.response_ids) == cfg.max_new_tokens for s in samples)
    return stats


def main(argv: list[str] | None = None) -> dict:
    return stage_main(KIND, __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
