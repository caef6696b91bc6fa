"""Stage `prepare`: the prompt sets data/prompts/{sft,opd,eval}.parquet (pipeline/offline_opd/contract/prompts.py's contract).

The task (pipeline/offline_opd/tasks/) makes the splits; this stage only writes them.

`task.kind: addition` generates the embedded toy task (disjoint splits, so eval prompts are never
trained on). `task.kind: file` reads your JSONL or Parquet `task.prompt_file` with a `prompt` column and
optionally `prompt_id`, `answer` (what the verifier compares against; numbers are compared by value,
GSM8K "#### 42" works) and `split` (sft/opd/eval). Without `split`, the rows are shuffled with
`task.seed` and cut into task.n_sft / n_opd / n_eval. The three files appear together or not at all.

The prompt file must sit in `prompt_files/` next to params.yaml: dvc.yaml declares that folder as a
dependency of `prepare` (a `${task.prompt_file}` dependency cannot be written, DVC templating fails
on the toy default `null`), so editing the file reruns `prepare` and whatever its output changes.
A file elsewhere would be read without DVC noticing its edits, so it is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offline_opd.atomic import atomic_dir
from offline_opd.config import TaskConfig
from offline_opd.contract.prompts import write_prompts
from offline_opd.runtime import cli, stage_main
from offline_opd.tasks.task import make_task


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for sft.parquet, opd.parquet and eval.parquet (data/prompts)")


def run(args: argparse.Namespace, cfg: TaskConfig) -> dict:
    splits = make_task(cfg, args.params).splits()
    with atomic_dir(args.out) as tmp:
        for name, table in splits.items():
            write_prompts(tmp / f"{name}.parquet", table)
    return {f"n_{name}": table.num_rows for name, table in splits.items()}


def main(argv: list[str] | None = None) -> dict:
    return stage_main("prepare", __doc__, add_args, run, argv, section="task")


if __name__ == "__main__":
    cli(main)
