"""Stage `prepare`: the prompt sets data/prompts/{sft,opd,eval}.parquet (columns prompt_id, prompt, answer).

`task.kind: addition` generates the embedded toy task (disjoint splits, so eval prompts are never
trained on). `task.kind: file` reads your JSONL or Parquet `task.prompt_file` with a `prompt` column and
optionally `prompt_id`, `answer` (what the verifier compares against; numbers are compared by value,
GSM8K "#### 42" works) and `split` (sft/opd/eval). Without `split`, the rows are shuffled with
`task.seed` and cut into task.n_sft / n_opd / n_eval. The three files appear together or not at all.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tasks import addition as toy_task
from pipeline.atomic import atomic_dir
from pipeline.config import TaskConfig
from pipeline.prompts import PROMPT_SCHEMA, SPLITS, PromptFileError, validate_prompts
from pipeline.stage import stage_main

log = logging.getLogger("opd")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for sft.parquet, opd.parquet and eval.parquet (data/prompts)")


def addition_splits(cfg: TaskConfig) -> dict[str, pa.Table]:
    sizes = {"sft": cfg.n_sft, "opd": cfg.n_opd, "eval": cfg.n_eval}
    problems = toy_task.make_splits(cfg.digits, sizes, cfg.seed)
    return {name: pa.table({"prompt_id": [p.prompt_id for p in rows], "prompt": [p.prompt for p in rows],
                            "answer": [p.answer for p in rows]}, schema=PROMPT_SCHEMA)
            for name, rows in problems.items()}


def read_prompt_file(path: Path) -> pa.Table:
    """A user's JSONL (one object per line) or Parquet file, as an Arrow table."""
    if not path.exists():
        raise PromptFileError(f"{path}: task.prompt_file not found; fix the path in params.yaml")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pj

            return pj.read_json(path)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise PromptFileError(f"{path}: could not read it as {suffix[1:]} ({exc})") from exc
    raise PromptFileError(f"{path}: unknown file type {suffix!r}; use .jsonl (one JSON object per line) or .parquet")


def file_splits(cfg: TaskConfig, path: Path) -> dict[str, pa.Table]:
    raw = read_prompt_file(path)
    table = validate_prompts(raw, str(path))
    if "split" in raw.column_names:
        split = raw.column("split").cast(pa.string()).to_pylist()
        bad = sorted({str(s) for s in split} - set(SPLITS))
        if bad:
            raise PromptFileError(f"{path}: column 'split' holds {', '.join(map(repr, bad[:3]))}; "
                                  f"allowed values are {', '.join(SPLITS)}")
        out = {name: table.filter(pa.array([s == name for s in split])) for name in SPLITS}
    else:
        sizes = {"sft": cfg.n_sft, "opd": cfg.n_opd, "eval": cfg.n_eval}
        if sum(sizes.values()) > table.num_rows:
            raise PromptFileError(f"{path}: has {table.num_rows} prompts but task.n_sft + n_opd + n_eval = "
                                  f"{sum(sizes.values())}; lower those sizes or add a 'split' column")
        order = list(range(table.num_rows))
        random.Random(cfg.seed).shuffle(order)
        out, start = {}, 0
        for name, n in sizes.items():
            out[name] = table.take(pa.array(order[start:start + n], pa.int64()))
            start += n
    empty = [name for name, t in out.items() if t.num_rows == 0]
    if empty:
        raise PromptFileError(f"{path}: split {empty[0]!r} is empty; every split (sft, opd, eval) needs prompts")
    overlap = set(out["eval"].column("prompt").to_pylist()) & (
        set(out["sft"].column("prompt").to_pylist()) | set(out["opd"].column("prompt").to_pylist()))
    if overlap:
        log.warning("%s: %d eval prompts also appear in sft/opd: eval accuracy will not be held out",
                    path, len(overlap))
    return out


def run(args: argparse.Namespace, cfg: TaskConfig) -> dict:
    if cfg.kind == "addition":
        splits = addition_splits(cfg)
    else:
        if not cfg.prompt_file:
            raise PromptFileError(f"{args.params}: task.kind is 'file' but task.prompt_file is null; "
                                  f"set it to a .jsonl or .parquet file of prompts")
        splits = file_splits(cfg, Path(cfg.prompt_file))
    with atomic_dir(args.out) as tmp:
        for name, table in splits.items():
            pq.write_table(table, tmp / f"{name}.parquet")
    return {f"n_{name}": table.num_rows for name, table in splits.items()}


def main(argv: list[str] | None = None) -> dict:
    return stage_main("prepare", __doc__, add_args, run, argv, section="task")


if __name__ == "__main__":
    main()
