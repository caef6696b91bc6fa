"""opd-inspect: the DuckDB views and queries agree with values computed independently from the shards."""

import math
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline_opd.models.loading import build_char_tokenizer
from offline_opd.contract import shards
from offline_opd.contract.codec import Codec, TeacherFormat
from offline_opd.tools.inspect_shards import (META_SQL, QUERIES, SUMMARY_SQL, TOKENS_SUMMARY_SQL, TOKENS_VIEW_SQL,
                                              TOP_GAPS_SQL, connect, format_table, main, query, views_sql)
from tests.tiny_models import save_model, teacher_meta, write_teacher_shards

META = teacher_meta("a" * 16, "b" * 16, "c" * 16, k=4)


@pytest.fixture
def folder(tmp_path):
    write_teacher_shards(tmp_path / "topk", META, n_parts=3, per_part={2: {"teacher_path": "other"}})
    return tmp_path / "topk"


def test_summary_matches_pyarrow_and_file_sizes(folder):
    columns, rows = query(connect(f"{folder}/*.parquet"), SUMMARY_SQL)
    got = {r[0]: dict(zip(columns, r)) for r in rows}
    total_bytes = total_tokens = 0
    for path in shards.list_parts(folder):
        table = pq.read_table(path)
        tokens = sum(len(x) - p for x, p in zip(table["input_ids"].to_pylist(), table["prompt_len"].to_pylist()))
        size = path.stat().st_size
        row = got[path.name]
        assert (row["rows"], row["response_tokens"], row["k"], row["file_bytes"]) == (table.num_rows, tokens, "4", size)
        assert row["teacher_fingerprint"] == "a" * 16
        assert row["bytes_per_token"] == pytest.approx(size / tokens, abs=0.01)
        total_bytes, total_tokens = total_bytes + size, total_tokens + tokens
    assert got["total"]["file_bytes"] == total_bytes and got["total"]["response_tokens"] == total_tokens


def test_meta_lists_every_footer_key_of_every_shard(folder):
    columns, rows = query(connect(f"{folder}/*.parquet"), META_SQL)
    shown = {(key, value): where for key, value, where in rows}
    for path in shards.list_parts(folder):
        for key, value in shards.read_meta(path).items():
            where = shown[(key, value)]
            assert where == "all 3" or path.name in where.split()
    assert shown[("teacher_path", "other")] == "part-00002.parquet"
    assert shown[("teacher_path", "t")] == "part-00000.parquet part-00001.parquet"


def hand_shard(path, dtype):
    """One response "15" to "7+8=" whose teacher numbers are chosen by hand (k=2)."""
    tok = build_char_tokenizer()
    prompt = tok("7+8=")["input_ids"]
    one, two, four, five = tok.convert_tokens_to_ids(list("1245"))
    row = {"sample_id": "s#0", "prompt_id": "s", "input_ids": prompt + [one, five], "prompt_len": len(prompt),
           "student_logprobs": [math.log(0.5), math.log(0.01)],
           "teacher_logprob": [math.log(0.6), math.log(0.25)],
           "tail_logprob": [math.log(0.1), math.log(0.25)],
           "topk_ids": [one, two, four, five],
           "topk_logprobs": [math.log(p) for p in (0.6, 0.3, 0.5, 0.25)]}
    shards.write_shard(path, pa.Table.from_pylist([row]), {**META, "k": 2}, shards.teacher_schema(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_token_view_matches_hand_computation(tmp_path, dtype):
    hand_shard(tmp_path / shards.part_name(0), dtype)
    con = connect(f"{tmp_path}/*.parquet")
    con.execute(TOKENS_VIEW_SQL)
    cols, rows = query(con, "SELECT t, teacher_entropy, tail_p, sampled_is_teacher_argmax, gap FROM tokens ORDER BY t")
    tol = 1e-5 if dtype == "float32" else 2e-3
    for (t, entropy, tail, agree, gap), probs, teacher, student, want_agree in zip(
            rows, [(0.6, 0.3), (0.5, 0.25)], [0.6, 0.25], [0.5, 0.01], [True, False]):
        p = np.array([*probs, 1 - sum(probs)])
        assert entropy == pytest.approx(-(p * np.log(p)).sum(), abs=tol)
        assert tail == pytest.approx(1 - sum(probs), abs=tol)
        assert agree is want_agree
        assert gap == pytest.approx(math.log(teacher / student), abs=1e-5)


def test_tokens_command_decodes_the_largest_gap_in_context(tmp_path, capsys):
    hand_shard(tmp_path / "s" / shards.part_name(0), "float32")
    model = save_model(tmp_path / "teacher")
    main(["--shards", f"{tmp_path}/s/*.parquet", "tokens", "--top", "1", "--tokenizer", str(model)])
    out = capsys.readouterr().out
    first_gap_line = out.split("largest teacher-student gaps")[1].splitlines()[3]
    assert "7+8=1⟦5⟧" in first_gap_line and "3.219" in first_gap_line


def test_tail_bucket_is_zero_when_topk_holds_all_mass(tmp_path):
    """Version 1 shards rebuild the tail: float16 rounding can make the top-k sum exceed 1, so the tail
    clamps to 0 and entropy stays finite."""
    row = {"sample_id": "s#0", "prompt_id": "s", "input_ids": [1, 5, 6], "prompt_len": 1,
           "student_logprobs": [-0.1, -0.1], "teacher_logprob": [-0.69, 0.0],
           "topk_ids": [5, 7, 6, 8], "topk_logprobs": [math.log(0.5), math.log(0.5001), 0.0, -30.0]}
    v1 = TeacherFormat(Codec("plain", logprob_dtype="float32"), width=2, samples=0, exact_tail=False)
    shards.write_shard(tmp_path / shards.part_name(0), pa.Table.from_pylist([row]),
                       {**META, "k": 2, "schema_version": "1"}, shards.teacher_schema(v1))
    con = connect(f"{tmp_path}/*.parquet")
    con.execute(TOKENS_VIEW_SQL)
    (_, rows) = query(con, "SELECT tail_p, teacher_entropy FROM tokens ORDER BY t")
    assert rows[0][0] == 0 and rows[0][1] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[1][1] == pytest.approx(0, abs=1e-9)


def test_k0_shards_have_no_entropy_but_keep_log_probs(tmp_path):
    write_teacher_shards(tmp_path, {**META, "k": 0}, n_parts=1)
    con = connect(f"{tmp_path}/*.parquet")
    con.execute(TOKENS_VIEW_SQL)
    (_, rows) = query(con, "SELECT count(*), count(teacher_entropy), count(tail_p), count(sampled_is_teacher_argmax), "
                           "count(gap) FROM tokens")
    n, entropy, tail, agree, gap = rows[0]
    assert n > 0 and (entropy, tail, agree) == (0, 0, 0) and gap == n


def test_sql_command_has_all_views(folder, capsys):
    main(["sql", "--shards", f"{folder}/*.parquet",  # --shards after the subcommand works too
          "select count(*) as n, count(distinct filename) as files from tokens join shard_files using (filename)"])
    out = capsys.readouterr().out.splitlines()
    tables = [pq.read_table(path) for path in shards.list_parts(folder)]
    want = sum(len(x) - p for t in tables for x, p in zip(t["input_ids"].to_pylist(), t["prompt_len"].to_pylist()))
    assert out[2].split() == [str(want), "3"]


def test_sql_and_meta_work_on_rollout_shards(tmp_path, capsys):
    table = pq.read_table(write_teacher_shards(tmp_path / "t", META, n_parts=1)[0]).select(shards.ROLLOUT_SCHEMA.names)
    meta = {"kind": "rollouts", "policy_fingerprint": "b" * 16, "tokenizer_fingerprint": "c" * 16, "backend": "hf",
            "backend_version": "x", "sampling_temperature": 1.0}
    shards.write_shard(tmp_path / "r" / shards.part_name(0), table, meta, shards.ROLLOUT_SCHEMA)
    main(["sql", "--shards", f"{tmp_path}/r/*.parquet", "select count(*) as n from shards"])
    assert capsys.readouterr().out.splitlines()[2].strip() == str(table.num_rows)
    main(["meta", "--shards", f"{tmp_path}/r/*.parquet"])
    assert re.search(r"^policy_fingerprint +b{16} +all 1$", capsys.readouterr().out, re.M)


def test_printed_queries_run_in_plain_duckdb(folder, capsys):
    """What the README shows (`opd-inspect queries`) is valid DuckDB on its own, no Python involved."""
    main(["--shards", f"{folder}/*.parquet", "queries"])
    printed = capsys.readouterr().out
    assert "parquet_kv_metadata" in printed and all(f"-- {name}" in printed for name in QUERIES)
    con = duckdb.connect()
    con.execute(views_sql(shards.list_parts(folder)))
    con.execute(TOKENS_VIEW_SQL)
    assert len(con.execute(TOKENS_SUMMARY_SQL).fetchall()) == 4  # three shards + total
    con.execute("SET VARIABLE top = 3; SET VARIABLE context = 2;")
    gaps = con.execute(TOP_GAPS_SQL).fetchall()
    assert len(gaps) == 3 and all(len(row[-1]) <= 2 for row in gaps)
    assert abs(gaps[0][5]) >= abs(gaps[1][5]) >= abs(gaps[2][5])


def test_missing_and_broken_shards_fail_in_one_line(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--shards", f"{tmp_path}/nothing/*.parquet", "summary"])
    assert exc.value.code == 2 and "no shards match" in capsys.readouterr().err
    path = folder / shards.part_name(1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit):
        main(["--shards", f"{folder}/*.parquet", "summary"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not a readable Parquet file") and err.count("\n") == 1


def test_format_table_aligns_numbers_right():
    text = format_table(["name", "n"], [("a", 1), ("long", 100), ("b", None)]).splitlines()
    assert text[0] == "name    n" and text[2] == "a       1" and text[3] == "long  100" and text[4] == "b"


def test_q8_shards_decode_in_sql_as_the_readme_shows(tmp_path):
    """A q8 shard: the `shards` view gives the same ids and log-probs as the data path's decoder, the
    tokens view works on it, and the views `opd-inspect queries` prints are the README's, verbatim."""
    from offline_opd.contract.codec import encode, make_codec
    from tests.tiny_models import teacher_rows

    rows = teacher_rows(6, 4, 100, seed=2)
    fmt = TeacherFormat(make_codec("q8", "", 100), width=4, samples=0, exact_tail=True)
    n = [len(x) - p for x, p in zip(rows["input_ids"].to_pylist(), rows["prompt_len"].to_pylist())]
    enc = [encode(fmt.codec, np.reshape(i, (t, 4)), np.reshape(lp, (t, 4)).astype(np.float32))
           for i, lp, t in zip(rows["topk_ids"].to_pylist(), rows["topk_logprobs"].to_pylist(), n)]
    table = rows.drop_columns(["topk_ids", "topk_logprobs"])
    for f in fmt.fields():
        if f.name in enc[0]:
            table = table.append_column(f.name, pa.array([e[f.name].tolist() for e in enc], f.type))
    shards.write_shard(tmp_path / shards.part_name(0), table, {**META, "codec": fmt.codec.to_meta()},
                       shards.teacher_schema(fmt))
    con = connect(f"{tmp_path}/*.parquet")
    got = con.execute("SELECT topk_ids, topk_logprobs FROM shards ORDER BY sample_id").fetchall()
    dec = fmt.decode(pq.read_table(tmp_path / shards.part_name(0)))
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), dec["topk_ids"].reshape(-1))
    np.testing.assert_allclose(np.concatenate([g[1] for g in got]), dec["topk_logprobs"].reshape(-1), atol=1e-6)
    np.testing.assert_allclose(dec["topk_logprobs"].reshape(-1), np.concatenate(rows["topk_logprobs"].to_pylist()),
                               atol=fmt.codec.lp_step / 2 + 1e-6)
    con.execute(TOKENS_VIEW_SQL)
    assert con.execute("SELECT count(*) FROM tokens WHERE tail_p > 0").fetchone()[0] == sum(n)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    part = tmp_path / shards.part_name(0)
    shown = views_sql([part]).replace(str(part), f"data/teacher_topk/{part.name}")
    assert shown.strip() in readme
