"""The user's prompt-file task (`task.kind: file`): prompts, optional answers and splits from a JSONL or Parquet file."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import TaskConfig
from pipeline.prompts import SPLITS, PromptFileError, validate_prompts

log = logging.getLogger("opd")


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


class PromptFileTask:
    """`task.prompt_file` cut into sft/opd/eval by its `split` column, or shuffled with `task.seed`."""

    def __init__(self, cfg: TaskConfig, where: str) -> None:
        if not cfg.prompt_file:
            raise PromptFileError(f"{where}: task.kind is 'file' but task.prompt_file is null; "
                                  f"set it to a .jsonl or .parquet file of prompts")
        self.cfg, self.path = cfg, Path(cfg.prompt_file)

    def splits(self) -> dict[str, pa.Table]:
        return file_splits(self.cfg, self.path)
