"""Prompt files (`task.kind: file`) as users write them: empty, malformed, huge, non-UTF-8, with a byte order
mark, in scripts the tokenizer has no tokens for, with duplicates. Each bad one is one line naming the file
(and the line or prompt id) from `prepare`, or from the first stage that tokenizes it; a byte order mark and
Windows line ends are read as the text they frame. (tests/test_bad_inputs.py has six more: Latin-1, a line
over 4 MiB, a broken line, a JSON list, a .csv and a non-Parquet .parquet.)
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.battery.project import edit_params, refuse, run

SPLITS = ["sft", "sft", "opd", "eval"]


def rows(*prompts: str) -> list[dict]:
    """One row per prompt with its split (the first ones sft, then opd, eval), ids p0, p1, ..."""
    splits = SPLITS + ["sft"] * max(0, len(prompts) - len(SPLITS))
    return [{"prompt_id": f"p{i}", "prompt": p, "answer": "1", "split": s}
            for i, (p, s) in enumerate(zip(prompts, splits))]


def jsonl(items: list[dict], newline: str = "\n") -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + newline for r in items).encode()


def use(project, content: bytes, name: str = "prompts.jsonl") -> str:
    (project / "prompt_files").mkdir(exist_ok=True)
    (project / "prompt_files" / name).write_bytes(content)
    edit_params(project, "task", kind="file", prompt_file=f"prompt_files/{name}")
    return name


GOOD = rows("1+1=", "2+2=", "3+3=", "4+4=")
REFUSED_BY_PREPARE = {   # name: (file content, words the line must hold besides the file's name)
    "empty file": (b"", "holds no prompts"),
    "only blank lines": (b"\n\n  \n", "holds no prompts"),
    "UTF-16": (jsonl(GOOD).decode().encode("utf-16"), "line 1 is not UTF-8"),
    "duplicate ids": (jsonl(GOOD[:3] + [{**GOOD[3], "prompt_id": "p1"}]), "'p1' appears more than once"),
    "duplicate prompts": (jsonl(rows("1+1=", "2+2=", "3+3=", "1+1=")), "prompt p3 repeats prompt p0"),
    "an empty prompt": (jsonl(rows("1+1=", "  ", "3+3=", "4+4=")), "prompt p1 is empty"),
    "a null prompt": (jsonl(GOOD[:3] + [{**GOOD[3], "prompt": None}]), "'prompt' is null in row 4"),
    "no prompt key": (jsonl([{"question": "1+1="}]), "no 'prompt' column"),
    "mixed types in a column": (jsonl(GOOD[:3] + [{**GOOD[3], "prompt": 4}]), "could not read it"),
    "a lone surrogate escape": (b'{"prompt": "\\ud800"}\n', "line 1 escapes a lone surrogate"),
    "a JSON string per line": (b'"1+1="\n', "not an object"),
    "an unknown split": (jsonl(GOOD[:3] + [{**GOOD[3], "split": "test"}]), "'test'"),
    "no eval split": (jsonl([{**r, "split": "sft"} for r in GOOD]), "split 'opd' is empty"),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_PREPARE))
def test_prepare_refuses_a_bad_prompt_file(project, capsys, case):
    content, words = REFUSED_BY_PREPARE[case]
    name = use(project, content)
    line = refuse(project, "prepare", capsys)
    assert name in line and words in line, line


def test_a_truncated_parquet_prompt_file(project, capsys):
    path = project / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    name = use(project, path.read_bytes()[:-20], "prompts.parquet")
    assert name in refuse(project, "prepare", capsys)


def test_a_symlink_out_of_prompt_files_is_refused(project, capsys):
    outside = project / "elsewhere.jsonl"
    outside.write_bytes(jsonl(GOOD))
    (project / "prompt_files").mkdir(exist_ok=True)
    (project / "prompt_files" / "link.jsonl").symlink_to(outside)
    edit_params(project, "task", kind="file", prompt_file="prompt_files/link.jsonl")
    assert "outside prompt_files/" in refuse(project, "prepare", capsys)


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(project, newline):
    use(project, b"\xef\xbb\xbf" + jsonl(GOOD, newline))
    run(project, "prepare")
    sft = pq.read_table(project / "data" / "prompts" / "sft.parquet").to_pylist()
    assert [r["prompt"] for r in sft] == ["1+1=", "2+2="] and sft[0]["prompt_id"] == "p0"


SCRIPTS = {"Cyrillic": "сколько 2+2=", "CJK": "二加二等于几", "emoji": "2+2=🙂", "Arabic (right to left)": "٢+٢=",
           "a combining accent": "e\u0301 2+2=", "a zero-width space": "2+\u200b2=",
           "a NUL byte": "2+2=\x00"}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_text_outside_the_tokenizers_alphabet_is_refused_where_it_is_tokenized(project, capsys, script):
    """The toy tokenizer knows printable ASCII: anything else would reach every model as <unk>."""
    use(project, jsonl(rows(SCRIPTS[script], "2+2=", "3+3=", "4+4=")))
    run(project, "prepare")
    line = refuse(project, "sft_data", capsys)
    assert "data/prompts/sft.parquet: prompt p0" in line and "tokenizer does not know" in line, line


def test_a_prompt_longer_than_the_context_is_refused_before_any_part_is_written(project, capsys):
    """A huge prompt (200 kB, one line): prepare takes it; sft_data refuses it before its first part."""
    use(project, jsonl(rows("1+" * 100_000 + "1=", "2+2=", "3+3=", "4+4=")))
    run(project, "prepare")
    assert "sft_data.max_model_len is 256" in refuse(project, "sft_data", capsys)
