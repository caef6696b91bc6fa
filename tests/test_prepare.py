"""Stage `prepare`: toy splits, user JSONL/Parquet prompt files, and clear errors that leave nothing behind."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from offline_opd.stages import prepare
from offline_opd.contract.prompts import PROMPT_SCHEMA, read_prompts

TASK = {"kind": "addition", "digits": 3, "n_sft": 60, "n_opd": 20, "n_eval": 10, "seed": 0, "prompt_file": None,
        "gap": None, "gap_prompts": None, "style": "columns"}


def run_prepare(tmp_path, out_name: str = "prompts", **task):
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"task": {**TASK, **task}}))
    out = tmp_path / out_name
    prepare.main(["--params", str(params), "--metrics-dir", str(tmp_path / "metrics"), "--out", str(out)])
    return {name: read_prompts(out / f"{name}.parquet") for name in ("sft", "opd", "eval")}


def prompt_path(tmp_path, name: str):
    """Where prepare accepts a prompt file: prompt_files/ next to params.yaml (the folder DVC tracks)."""
    folder = tmp_path / "prompt_files"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def expect_error(tmp_path, capsys, match: str, **task):
    with pytest.raises(SystemExit) as exc:
        run_prepare(tmp_path, **task)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not (tmp_path / "prompts").exists()          # no partial output
    assert not list(tmp_path.glob(".prompts.tmp-*"))
    return err


def test_addition_splits_are_disjoint_and_sized(tmp_path):
    splits = run_prepare(tmp_path)
    assert {k: t.num_rows for k, t in splits.items()} == {"sft": 60, "opd": 20, "eval": 10}
    prompts = [p for t in splits.values() for p in t.column("prompt").to_pylist()]
    assert len(set(prompts)) == len(prompts)
    assert splits["eval"].schema.equals(PROMPT_SCHEMA)
    row = splits["eval"].to_pylist()[0]
    a, b = row["prompt"][:-1].split("+")
    assert row["answer"] == str(int(a) + int(b))
    again = run_prepare(tmp_path / "again")
    assert again["sft"].equals(splits["sft"])


@pytest.mark.parametrize("gap", ["big_column", "carry_out"])
def test_a_gap_puts_prompts_without_it_first_and_keeps_every_split(tmp_path, gap):
    """The teacher's split is the same set of prompts; only the student's budget (its head) is gap-free."""
    from offline_opd.tasks.addition import column_sums

    def has_gap(row: dict) -> bool:
        a, b = row["prompt"][:-1].split("+")
        return max(column_sums(a, b)) >= 15 if gap == "big_column" else int(row["answer"]) >= 1000

    plain = run_prepare(tmp_path / "plain", n_sft=200)
    gapped = run_prepare(tmp_path / "gap", n_sft=200, gap=gap, gap_prompts=50)
    head = gapped["sft"].to_pylist()[:50]
    assert not any(has_gap(r) for r in head)
    assert sorted(gapped["sft"].column("prompt_id").to_pylist()) == sorted(plain["sft"].column("prompt_id").to_pylist())
    assert any(has_gap(r) for r in plain["sft"].to_pylist()[:50])   # the drawn order has the gap's prompts there
    rest = [r["prompt_id"] for r in gapped["sft"].to_pylist()[50:]]
    assert rest == [p for p in plain["sft"].column("prompt_id").to_pylist() if p not in {r["prompt_id"] for r in head}]
    for split in ("opd", "eval"):
        assert gapped[split].equals(plain[split])


def test_a_gap_larger_than_the_split_holds_names_the_key_and_the_most_it_can_be(tmp_path, capsys):
    plain = run_prepare(tmp_path / "plain")
    short = sum(int(a) < 1000 for a in plain["sft"].column("answer").to_pylist())
    err = expect_error(tmp_path, capsys, "task.gap_prompts: 59", gap="carry_out", gap_prompts=59)
    assert f"only {short} of the 60 SFT prompts are without task.gap 'carry_out'" in err and "params.yaml" in err


def test_jsonl_with_split_column_and_numeric_answers(tmp_path):
    rows = [{"prompt": f"q{i}?", "answer": i, "split": ["sft", "opd", "eval"][i % 3]} for i in range(9)]
    path = prompt_path(tmp_path, "mine.jsonl")
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = run_prepare(tmp_path, kind="file", prompt_file=str(path))
    assert splits["opd"].column("prompt").to_pylist() == ["q1?", "q4?", "q7?"]
    assert splits["eval"].column("answer").to_pylist() == ["2", "5", "8"]
    assert len(set(splits["sft"].column("prompt_id").to_pylist())) == 3


def test_parquet_without_split_is_cut_by_seed_into_sizes(tmp_path):
    path = prompt_path(tmp_path, "mine.parquet")
    pq.write_table(pa.table({"prompt_id": [f"id{i}" for i in range(12)], "prompt": [f"p{i}" for i in range(12)]}), path)
    sizes = {"n_sft": 5, "n_opd": 4, "n_eval": 3}
    splits = run_prepare(tmp_path, "a", kind="file", prompt_file=str(path), **sizes)
    assert {k: t.num_rows for k, t in splits.items()} == {"sft": 5, "opd": 4, "eval": 3}
    ids = [i for t in splits.values() for i in t.column("prompt_id").to_pylist()]
    assert sorted(ids) == sorted(f"id{i}" for i in range(12))
    assert ids != [f"id{i}" for i in range(12)]        # shuffled, not just cut in file order
    assert splits["eval"].column("answer").null_count == 3
    same = run_prepare(tmp_path, "b", kind="file", prompt_file=str(path), **sizes)
    other = run_prepare(tmp_path, "c", kind="file", prompt_file=str(path), seed=1, **sizes)
    assert same["eval"].equals(splits["eval"])
    assert not other["sft"].equals(splits["sft"])


def test_wrong_columns_name_the_file(tmp_path, capsys):
    path = prompt_path(tmp_path, "bad.jsonl")
    path.write_text('{"question": "2+2?", "answer": "4"}\n')
    err = expect_error(tmp_path, capsys, str(path), kind="file", prompt_file=str(path))
    assert "'prompt'" in err and "question" in err


def test_bad_split_values_and_too_few_rows(tmp_path, capsys):
    path = prompt_path(tmp_path, "bad.jsonl")
    path.write_text('{"prompt": "a", "split": "train"}\n{"prompt": "b", "split": "eval"}\n')
    expect_error(tmp_path, capsys, "'train'", kind="file", prompt_file=str(path))
    short = prompt_path(tmp_path, "short.jsonl")
    short.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    expect_error(tmp_path, capsys, "has 2 prompts", kind="file", prompt_file=str(short))
    expect_error(tmp_path, capsys, "not found", kind="file", prompt_file=str(prompt_path(tmp_path, "missing.jsonl")))
