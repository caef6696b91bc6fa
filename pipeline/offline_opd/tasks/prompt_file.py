"""The user's prompt-file task (`task.kind: file`): prompts, optional answers and splits from a JSONL or Parquet file.

The prompt file must sit in `prompt_files/` next to params.yaml: dvc.yaml declares that folder as a
dependency of `prepare` (a `${task.prompt_file}` dependency cannot be written, DVC templating fails
on the toy default `null`), so editing the file reruns `prepare` and whatever its output changes.
A file elsewhere would be read without DVC noticing its edits, so it is refused.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from offline_opd.config import TaskConfig
from offline_opd.contract.prompts import SPLITS, PromptFileError, validate_prompts


PROMPT_DIR = "prompt_files"


def tracked_prompt_file(cfg: TaskConfig, params: Path) -> Path:
    """`task.prompt_file`, checked to lie inside the `prompt_files/` folder DVC tracks for `prepare`."""
    if not cfg.prompt_file:
        raise PromptFileError(f"{params}: task.prompt_file is null but task.kind is 'file'; "
                              f"set it to a .jsonl or .parquet file in {PROMPT_DIR}/")
    path = Path(cfg.prompt_file)
    folder = (params.parent / PROMPT_DIR).resolve()
    if not path.resolve().is_relative_to(folder):
        raise PromptFileError(f"{params}: task.prompt_file {path} is outside {PROMPT_DIR}/; move it into "
                              f"{folder} (the folder dvc.yaml tracks for prepare, so edits rerun it)")
    return path


# A longer line is refused with its number: pyarrow's reader fails on lines over its block size and
# can then hang; no prompt of a text task needs more than this.
MAX_LINE_BYTES = 4 << 20


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file, read line by line so a bad line is reported by its number."""
    rows = []
    with path.open("rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(line) > MAX_LINE_BYTES:
                raise PromptFileError(f"{path}: line {number} is longer than {MAX_LINE_BYTES >> 20} MiB; "
                                      f"split or shorten that prompt")
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte order mark, as Windows editors write: not part of the JSON
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptFileError(f"{path}: line {number} is not UTF-8 (byte {exc.start}); "
                                      f"re-save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{path}: line {number} is not JSON ({exc.msg}); "
                                      f"write one JSON object per line") from None
            if not isinstance(row, dict):
                raise PromptFileError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object "
                                      f"with a 'prompt' key")
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise PromptFileError(f"{path}: line {number} escapes a lone surrogate ({exc.object[exc.start]!r}), "
                                      f"which is not text; fix the escape (a pair such as \\ud83d\\ude00, or the "
                                      f"character itself)") from None
            rows.append(row)
    return rows


def read_prompt_file(path: Path) -> pa.Table:
    """A user's JSONL (one object per line) or Parquet file, as an Arrow table."""
    if not path.exists():
        raise PromptFileError(f"{path}: task.prompt_file not found; fix the path in params.yaml")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            return pa.Table.from_pylist(read_jsonl(path))
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise PromptFileError(f"{path}: could not read it as {suffix[1:]} ({exc})") from exc
    raise PromptFileError(f"{path}: unknown file type {suffix!r}; use .jsonl (one JSON object per line) or .parquet")


def check_distinct(table: pa.Table, path: Path) -> None:
    """No empty prompt, and no prompt twice: a repeated prompt is trained on twice, counted twice by
    evaluate, or (across splits) makes eval accuracy not held out; usually two files were concatenated."""
    first: dict[str, str] = {}
    for pid, prompt in zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()):
        if not prompt.strip():
            raise PromptFileError(f"{path}: prompt {pid} is empty; remove it or write its text")
        if prompt in first:
            raise PromptFileError(f"{path}: prompt {pid} repeats prompt {first[prompt]} ({prompt[:40]!r}); "
                                  f"remove the duplicates (each prompt once)")
        first[prompt] = pid


def file_splits(cfg: TaskConfig, path: Path) -> dict[str, pa.Table]:
    raw = read_prompt_file(path)
    if raw.num_rows == 0:
        raise PromptFileError(f"{path}: holds no prompts (an empty file, or only blank lines); write one JSON "
                              f"object with a 'prompt' per line")
    table = validate_prompts(raw, str(path))
    check_distinct(table, path)
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
    return out


class PromptFileTask:
    """`task.prompt_file` cut into sft/opd/eval by its `split` column, or shuffled with `task.seed`."""

    def __init__(self, cfg: TaskConfig, params: Path) -> None:
        self.cfg, self.path = cfg, tracked_prompt_file(cfg, params)

    def splits(self) -> dict[str, pa.Table]:
        return file_splits(self.cfg, self.path)
