"""The prompt-set contract (`data/prompts/{sft,opd,eval}.parquet`) and how a prompt becomes token ids.

Columns: `prompt_id` (unique string), `prompt` (text), `answer` (reference answer for the verifier,
may be null), `reference` (a full reference response, may be null: the toy task's worked trace, which
the scratch toy teacher trains on). Every model sees a prompt through `encode_prompt`, so the teacher, π_ref and the
distilled student tokenize it identically.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from offline_opd.errors import UserError

SPLITS = ("sft", "opd", "eval")
PROMPT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=True),
    pa.field("reference", pa.string(), nullable=True),
])


class PromptFileError(UserError, ValueError):
    """A prompt file is unreadable or has the wrong columns. The message names the file and the fix."""


def validate_prompts(table: pa.Table, where: str) -> pa.Table:
    """Check columns and ids; return the table cast to PROMPT_SCHEMA (a missing `answer` or `reference` becomes null)."""
    if "prompt" not in table.column_names:
        raise PromptFileError(f"{where}: no 'prompt' column (found: {', '.join(table.column_names) or 'none'}); "
                              f"a prompt file needs 'prompt' and optionally 'prompt_id', 'answer', 'split'")
    if "prompt_id" not in table.column_names:
        table = table.append_column("prompt_id", pa.array([f"p{i:07d}" for i in range(table.num_rows)]))
    for optional in ("answer", "reference"):
        if optional not in table.column_names:
            table = table.append_column(optional, pa.nulls(table.num_rows, pa.string()))
    try:
        table = table.select(PROMPT_SCHEMA.names).cast(PROMPT_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise PromptFileError(f"{where}: columns prompt_id/prompt/answer/reference must be strings ({exc})") from exc
    ids = table.column("prompt_id")
    if ids.null_count or table.column("prompt").null_count:
        raise PromptFileError(f"{where}: 'prompt_id' and 'prompt' may not be null")
    if len(set(ids.to_pylist())) != table.num_rows:
        raise PromptFileError(f"{where}: 'prompt_id' values are not unique")
    return table


def read_prompts(path: Path | str) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: prompt file not found; run the `prepare` stage (dvc repro prepare)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise PromptFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    return validate_prompts(table, str(path))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt: the chat template when the tokenizer has one, else plain text plus BOS."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
