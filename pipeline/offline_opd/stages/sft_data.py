"""Stage `sft_data`: the teacher answers the SFT prompts; π_ref is then fine-tuned on exactly these answers.

This is what ties SFT to the teacher (docs/design.md §5): every part's footer records the teacher's and the
tokenizer's fingerprints, so `sft` and `distill` can prove later that the teacher scoring the rollouts
is the one that wrote this data (only the first `sft_data.n_prompts` prompts, when set). Output:
data/sft/part-XXXXX.parquet (prompt_id, prompt, response, input_ids = prompt + response ids, prompt_len),
`sft_data.rows_per_shard` prompts per part. Decoding is greedy with `sft_data.temperature: 0`, else sampled
with seeds from (seed, part index), so parts are
independent: a rerun skips finished parts, `--shard i/n` lets n processes fill one folder, and
`sft_data.cluster.backend: ray` spreads this process's parts over a Ray Data actor pool. Under
multi-teacher OPD (a --teacher folder with one teacher per domain) each prompt is answered by its domain's
teacher, and each row records its domain and that teacher's fingerprint (contract/tables.py DOMAIN_FIELDS).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from offline_opd.contract import shards
from offline_opd.config import SftDataConfig
from offline_opd.backends.engine import load_engine
from offline_opd.backends.base import Sampling, batch_seed
from offline_opd.backends.pool import run_units
from offline_opd.backends.routing import RoutedEngine
from offline_opd.contract.parts import PromptParts, plan_parts
from offline_opd.contract.tables import SFT_SCHEMA, add_domains, sft_table, with_domains
from offline_opd.provenance.teachers import Teachers, load_teachers
from offline_opd.runtime import add_shard_arg, cli, stage_main

KIND = "sft_data"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model folder (data/models/teacher)")
    parser.add_argument("--prompts", type=Path, required=True, help="SFT prompt set (data/prompts/sft.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the part-XXXXX.parquet shards (data/sft)")
    add_shard_arg(parser)


@dataclass(frozen=True)
class SftDataWork:
    """Part j of the SFT data: the teacher answers the part's prompts and the part is written, by whichever
    process runs it (offline_opd.backends.pool)."""

    teachers: Teachers
    cfg: SftDataConfig
    plan: PromptParts
    out: Path

    @contextmanager
    def open(self) -> Iterator[Callable[[int], dict]]:
        engine = RoutedEngine(self.teachers, lambda path: load_engine(
            path, self.cfg, KIND, tensor_parallel=self.cfg.cluster.tensor_parallel))
        try:
            yield partial(self.part, engine)
        finally:
            engine.close()

    def part(self, engine: RoutedEngine, j: int) -> dict:
        cfg, plan, rows, domains = self.cfg, self.plan, self.plan.bounds(j), self.plan.part_domains(j)
        sampling = Sampling(1, cfg.temperature, cfg.max_new_tokens, seed=batch_seed(cfg.seed, j))
        samples = [row[0] for row in engine.generate(plan.tokens[rows], sampling, domains)]
        table = sft_table(plan.prompt_ids[rows], plan.texts[rows], plan.tokens[rows], samples, engine.tokenizer)
        if domains is not None:
            table = add_domains(table, domains, plan.footer.teachers)
        shards.write_shard(self.out / shards.part_name(j), table, plan.footer,
                           with_domains(SFT_SCHEMA, domains is not None),
                           before_replace=plan.pending.replaced_by(j))
        return {"rows": len(samples), "response_tokens": sum(len(s.response_ids) for s in samples),
                "at_max_new_tokens": sum(len(s.response_ids) == cfg.max_new_tokens for s in samples)}


def run(args: argparse.Namespace, cfg: SftDataConfig) -> dict:
    teachers = load_teachers(args.teacher)
    plan = plan_parts(KIND, teachers, args.prompts, args.out, cfg,
                      per_part=cfg.rows_per_shard, shard=args.shard, size_key="n_sft",
                      limit=cfg.n_prompts)
    stats = {"parts_total": plan.footer.num_parts, "parts_skipped": plan.skipped, "parts_written": 0, "rows": 0,
             "response_tokens": 0, "at_max_new_tokens": 0}
    if not plan.todo:
        plan.pending.clear_stale()
        return stats
    for _, record in run_units(SftDataWork(teachers, cfg, plan, args.out), plan.todo, cfg.cluster, KIND):
        stats["parts_written"] += 1
        for key, value in record.items():
            stats[key] += value
    return stats


def main(argv: list[str] | None = None) -> dict:
    return stage_main(KIND, __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
