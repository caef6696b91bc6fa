"""The prompt-set contract (`data/prompts/{sft,opd,eval}.parquet`) and how a prompt becomes token ids.

Columns: `prompt_id` (unique string), `prompt` (text), `answer` (reference answer for the verifier,
may be null), `reference` (a full reference response, may be null: the toy task's worked trace, which
the scratch toy teacher trains on), and optionally `domain` (a name: which domain teacher answers and scores the
prompt under multi-teacher OPD, `teacher.domains`; a prompt set without the column is one domain, and is written
without it, byte for byte as before). Every model sees a prompt through `encode_prompt`, so the teacher, π_ref
and the distilled student tokenize it identically.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from offline_opd.contract.integrity import verify_sealed, write_sealed
from offline_opd.errors import UserError

SPLITS = ("sft", "opd", "eval")
PROMPT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=True),
    pa.field("reference", pa.string(), nullable=True),
])
DOMAIN = "domain"
DOMAIN_PROMPT_SCHEMA = PROMPT_SCHEMA.append(pa.field(DOMAIN, pa.string(), nullable=False))


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
    for required in ("prompt_id", "prompt"):
        column = table.column(required)
        if column.null_count:
            row = column.is_null().to_pylist().index(True)
            raise PromptFileError(f"{where}: '{required}' is null in row {row + 1}; every prompt needs one")
    schema = DOMAIN_PROMPT_SCHEMA if DOMAIN in table.column_names else PROMPT_SCHEMA
    if DOMAIN in table.column_names and table.column(DOMAIN).null_count:
        row = table.column(DOMAIN).is_null().to_pylist().index(True)
        raise PromptFileError(f"{where}: 'domain' is null in row {row + 1}; give every prompt a domain, or drop "
                              f"the column (one domain)")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise PromptFileError(f"{where}: columns prompt_id/prompt/answer/reference must be strings ({exc})") from exc
    ids = table.column("prompt_id")
    if len(set(ids.to_pylist())) != table.num_rows:
        seen: set[str] = set()
        twice = next(i for i in ids.to_pylist() if i in seen or seen.add(i))
        raise PromptFileError(f"{where}: 'prompt_id' values are not unique ({twice!r} appears more than once); "
                              f"give every prompt its own id, or drop the column to have ids assigned")
    return table


def write_prompts(path: Path | str, table: pa.Table) -> None:
    """One prompt set, sealed with a whole-file checksum that `read_prompts` verifies."""
    write_sealed(path, table.cast(DOMAIN_PROMPT_SCHEMA if DOMAIN in table.column_names else PROMPT_SCHEMA))


def prompt_domains(table: pa.Table) -> list[str] | None:
    """Each prompt's domain, in row order; None for a prompt set without domains (one domain)."""
    return table.column(DOMAIN).to_pylist() if DOMAIN in table.column_names else None


def read_prompts(path: Path | str) -> pa.Table:
    """A prompt set `prepare` wrote, checked byte for byte against its seal and then against the contract."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: prompt file not found; run the `prepare` stage (dvc repro prepare)")
    if path.is_dir():
        raise PromptFileError(f"{path}: is a folder, expected a prompt set written by `prepare` (a .parquet file)")
    try:
        if verify_sealed(path) is False:
            raise PromptFileError(f"{path}: its bytes do not match the checksum sealed in its footer (a flipped, "
                                  f"lost or added byte): the file is corrupt: rerun `dvc repro prepare`")
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise PromptFileError(f"{path}: not a readable Parquet file ({exc}); rerun `dvc repro prepare`") from exc
    return validate_prompts(table, str(path))


def encode_prompt(tokenizer, prompt: str, where: str = "a prompt") -> list[int]:
    """Token ids of a prompt: the chat template when the tokenizer has one, else plain text plus BOS.

    Text the tokenizer cannot represent (characters outside a fixed alphabet, such as the toy models'
    printable ASCII) would reach every model as the unknown token, so teacher and student would
    answer a prompt neither can read: refused, naming the characters (`where` names the prompt).
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids and tokenizer.unk_token not in prompt:
        unknown = [c for c in dict.fromkeys(prompt) if unk in tokenizer(c, add_special_tokens=False)["input_ids"]]
        shown = "".join(unknown[:8]) + ("..." if len(unknown) > 8 else "")
        raise PromptFileError(f"{where} ({prompt[:40]!r}{'...' if len(prompt) > 40 else ''}) holds characters the "
                              f"tokenizer does not know ({shown!r}, {len(unknown)} in all): every model would read "
                              f"them as {tokenizer.unk_token}; remove them from the prompt file, or use models "
                              f"whose tokenizer covers them")
    return ids


class PrivilegedPrompts:
    """Teacher prompt ids under `teacher_topk.privileged_context` (a template over {prompt} and {answer}), per
    prompt_id: the teacher scores the student's responses after a prompt the student never saw."""

    def __init__(self, template: str, prompts_path: Path, tokenizer) -> None:
        # The template's fields were checked at params load (config.check_template).
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        table = read_prompts(prompts_path)
        ids, texts, answers = (table.column(c).to_pylist() for c in ("prompt_id", "prompt", "answer"))
        if "answer" in fields and None in answers:
            raise UserError(f"{prompts_path}: prompt {ids[answers.index(None)]} has no answer, but "
                            f"teacher_topk.privileged_context uses {{answer}}")
        self.tokenizer, self.template, self.path = tokenizer, template, prompts_path
        self.rows = dict(zip(ids, zip(texts, answers)))
        self.digest = hashlib.sha256(json.dumps([ids, texts, answers]).encode()).hexdigest()

    def encode(self, prompt_id: str) -> list[int]:
        if prompt_id not in self.rows:
            raise UserError(f"{self.path}: no prompt {prompt_id!r}, which the rollouts hold; pass the OPD "
                            f"prompt set the rollouts were sampled from with --prompts")
        prompt, answer = self.rows[prompt_id]
        return encode_prompt(self.tokenizer, self.template.format(prompt=prompt, answer=answer))


def teacher_inputs(table: pa.Table, privileged: PrivilegedPrompts | None) -> tuple[list[list[int]], list[int]]:
    """What the teacher scores: the rollout rows as they are, or the same responses after the privileged prompt."""
    ids, plens = table.column("input_ids").to_pylist(), table.column("prompt_len").to_pylist()
    if privileged is None:
        return ids, plens
    cache: dict[str, list[int]] = {}
    out = []
    for pid, seq, p in zip(table.column("prompt_id").to_pylist(), ids, plens):
        if pid not in cache:
            cache[pid] = privileged.encode(pid)
        out.append(cache[pid] + seq[p:])
    return out, [len(cache[pid]) for pid in table.column("prompt_id").to_pylist()]


TOY_TEACHER_FIX = ("teacher.source 'scratch' trains the embedded toy teacher on the toy task's traces. With your own "
                   "prompts set teacher.source to a Hugging Face model folder")


def reference_sequences(tokenizer, prompts: list[str], references: list[str | None], where: Path | str,
                        column: str = "reference", fix: str = TOY_TEACHER_FIX) -> list[tuple[list[int], int]]:
    """Prompt + reference response + eos as ids, with the prompt's length, for each prompt (the toy teacher's
    training set, or a fine-tuned teacher's from the `answer` column); refuses a prompt whose `column`
    is null, saying `fix`."""
    out = []
    for prompt, reference in zip(prompts, references):
        if reference is None:
            raise UserError(f"{where}: prompt {prompt!r} has no {column!r} response; {fix}")
        prompt_ids = encode_prompt(tokenizer, prompt)
        response = tokenizer(reference, add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + response + [tokenizer.eos_token_id], len(prompt_ids)))
    return out
