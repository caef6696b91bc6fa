"""opd-inspect: the DuckDB views and queries agree with values computed independently from the shards."""

import math
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline_opd.models.toy import build_char_tokenizer
from offline_opd.contract import shards, tables
from offline_opd.contract.codec import Compact, Plain, make_codec
from offline_opd.contract.tables import TeacherFormat
from offline_opd.tools.inspect_shards import (META_SQL, QUERIES, SUMMARY_SQL, TOKENS_SUMMARY_SQL, TOKENS_VIEW_SQL,
                                              TOP_GAPS_SQL, connect, format_table, frame, main, query,
                                              views_sql)
from tests.tiny_models import legacy, save_model, teacher_meta, write_teacher_shards

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
           "behavior_logprob": [math.log(0.5), math.log(0.01)],
           "teacher_logprob": [math.log(0.6), math.log(0.25)],
           "tail_logprob": [math.log(0.1), math.log(0.25)],
           "topk_ids": [one, two, four, five],
           "topk_logprobs": [math.log(p) for p in (0.6, 0.3, 0.5, 0.25)]}
    shards.write_shard(path, pa.Table.from_pylist([row]), {**META, "k": 2}, tables.teacher_schema(dtype))


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
           "behavior_logprob": [-0.1, -0.1], "teacher_logprob": [-0.69, 0.0],
           "topk_ids": [5, 7, 6, 8], "topk_logprobs": [math.log(0.5), math.log(0.5001), 0.0, -30.0]}
    v1 = TeacherFormat(Plain("float32"), width=2, samples=0, exact_tail=False)
    old, schema = legacy(pa.Table.from_pylist([row]), tables.teacher_schema(v1), "1")
    shards.write_shard(tmp_path / shards.part_name(0), old, {**META, "k": 2, "schema_version": "1"}, schema)
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
    table = pq.read_table(write_teacher_shards(tmp_path / "t", META, n_parts=1)[0]).select(tables.ROLLOUT_SCHEMA.names)
    meta = {"kind": "rollouts", "policy_fingerprint": "b" * 16, "tokenizer_fingerprint": "c" * 16, "backend": "hf",
            "backend_version": "x", "sampling_temperature": 1.0}
    shards.write_shard(tmp_path / "r" / shards.part_name(0), table, meta, tables.ROLLOUT_SCHEMA)
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


def test_frame_is_the_decoded_views_as_a_polars_dataframe(tmp_path):
    import polars as pl

    hand_shard(tmp_path / shards.part_name(0), "float32")
    spec = f"{tmp_path}/*.parquet"
    columns, rows = query(connect(spec), "SELECT * FROM shards")
    df = frame(spec)
    assert isinstance(df, pl.DataFrame) and df.columns == columns
    assert df.rows() == rows and len(rows) > 0


def test_format_table_aligns_numbers_right():
    text = format_table(["name", "n"], [("a", 1), ("long", 100), ("b", None)]).splitlines()
    assert text[0] == "name    n" and text[2] == "a       1" and text[3] == "long  100" and text[4] == "b"


def coded_shard(path, codec, vocab: int, width: int, n_positions: int, seed: int = 0) -> TeacherFormat:
    """A teacher shard whose entry columns hold every code of `codec` (and the empty-slot marker), ids up to
    vocab - 1, written column by column (not through `encode`, which never produces some codes)."""
    rng = np.random.default_rng(seed)
    fmt = TeacherFormat(codec, width=width, samples=0, exact_tail=True)
    n = n_positions * width
    ids = np.concatenate([rng.choice(vocab, width, replace=False) for _ in range(n_positions)])
    ids[:width] = np.arange(vocab - width, vocab)                      # the largest ids too
    if isinstance(codec, Compact):
        codes = np.resize(np.arange(256), n)                           # 0..254 and 255 (empty)
        ids = np.sort(ids.reshape(n_positions, width), 1)
        cols = {"topk_id_delta": np.diff(ids, axis=1, prepend=0).reshape(-1),
                "topk_lp_code": codes, "topk_lp_top": rng.integers(0, 12 * 4096, n_positions)}
    else:
        codes = np.resize(np.arange(codec.code_max + 1), n)
        empty = rng.random(n) < 0.05
        cols = {"topk_ids": np.where(empty, codec.empty, ids), "topk_lpq": codes,
                "topk_lpmax": -rng.random(n_positions).astype(np.float32) * 12}
    lengths = np.diff(np.linspace(0, n_positions, 5).astype(int))   # four rows
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    rows = {"sample_id": [f"s{i}" for i in range(4)], "prompt_id": [f"p{i}" for i in range(4)],
            "input_ids": [[1] * (1 + t) for t in lengths], "prompt_len": [1] * 4,
            "behavior_logprob": [[-0.5] * t for t in lengths], "teacher_logprob": [[-0.5] * t for t in lengths],
            "tail_logprob": [[-3.0] * t for t in lengths]}
    for f in codec.fields():
        per = codec.widths(width)[f.name]
        rows[f.name] = pa.array([cols[f.name][a * per:b * per].tolist() for a, b in zip(bounds, bounds[1:])], f.type)
    shards.write_shard(path, pa.table(rows), {**META, "k": width, "width": width, "codec": codec.describe()},
                       tables.teacher_schema(fmt), fmt.encodings())
    return fmt


@pytest.mark.parametrize("name, vocab", [("q8", 100), ("q8", 151_936), ("q16", 151_936), ("compact", 151_936),
                                         ("compact", 49_152)])
def test_duckdb_decodes_every_code_as_the_data_path_does(tmp_path, name, vocab):
    """Codes 0..255 (q8), 0..65535 (q16), 0..254 and the empty marker (compact), ids up to V - 1 of a real
    vocabulary: the `shards` view's ids and log-probs equal `Codec.decode`'s (the README's q8 SQL once
    failed with a DECIMAL overflow from code 160 on)."""
    codec = make_codec(name, "", vocab)
    width, positions = (16, 4096) if name == "q16" else (32, 64)
    fmt = coded_shard(tmp_path / shards.part_name(0), codec, vocab, width, positions)
    con = connect(f"{tmp_path}/*.parquet")
    got = con.execute("SELECT topk_ids, topk_logprobs FROM shards ORDER BY sample_id").fetchall()
    dec = fmt.decode(pq.read_table(tmp_path / shards.part_name(0)))
    sql_ids = np.concatenate([g[0] for g in got])
    sql_lps = np.concatenate([g[1] for g in got]).astype(np.float32)
    np.testing.assert_array_equal(sql_ids, dec["topk_ids"].reshape(-1))
    assert sql_ids.max() == vocab - 1 and (sql_ids == -1).any()
    finite = np.isfinite(dec["topk_logprobs"].reshape(-1))
    assert (sql_lps[~finite] == -np.inf).all()
    # one float32 ulp: DuckDB's exp and numpy's may differ in the last bit of a double
    np.testing.assert_array_max_ulp(sql_lps[finite], dec["topk_logprobs"].reshape(-1)[finite], maxulp=1)
    con.execute(TOKENS_VIEW_SQL)
    argmax = con.execute("SELECT teacher_argmax FROM tokens ORDER BY sample_id, t").fetchall()
    lps = np.where(dec["topk_ids"] >= 0, dec["topk_logprobs"], -np.inf)
    want = dec["topk_ids"][np.arange(len(lps)), lps.argmax(1)]
    np.testing.assert_array_equal([a for (a,) in argmax], want)


def test_readme_shows_the_views_opd_inspect_prints(tmp_path):
    """The README's SQL is `opd-inspect queries` for a compact shard with 32 entries per position, verbatim."""
    coded_shard(tmp_path / shards.part_name(0), Compact(), 49_152, 32, 8)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    part = tmp_path / shards.part_name(0)
    shown = views_sql([part]).replace(str(part), f"data/teacher_topk/{part.name}")
    assert shown.strip() in readme
    assert TOKENS_VIEW_SQL.strip() in readme


def test_shards_of_schema_2_read_under_todays_names(tmp_path):
    """Version 2 shards name π_ref's log-prob `student_logprobs`: the data path and the views call it
    `behavior_logprob`, so old shards read unchanged."""
    from offline_opd.train.shard_data import collate

    table = pq.read_table(write_teacher_shards(tmp_path / "new", META, n_parts=1, dtype="float32")[0])
    old, schema = legacy(table, tables.teacher_schema("float32"), "2")
    assert "student_logprobs" in old.column_names
    shards.write_shard(tmp_path / "old" / shards.part_name(0), old, {**META, "schema_version": "2"}, schema)
    (info,) = shards.open_teacher_shards(tmp_path / "old")
    (back,) = list(shards.iter_row_groups(info, ["sample_id", "behavior_logprob"]))
    assert back.column("behavior_logprob").to_pylist() == table.column("behavior_logprob").to_pylist()
    batch = collate(pa.concat_tables(shards.iter_row_groups(info)), shards.teacher_format([info]))
    assert batch["behavior_logprob"].abs().sum() > 0
    con = connect(f"{tmp_path}/old/*.parquet")
    got = con.execute("SELECT behavior_logprob FROM shards ORDER BY sample_id").fetchall()
    want = table.sort_by("sample_id").column("behavior_logprob").to_pylist()
    assert all(g == pytest.approx(w) for (g,), w in zip(got, want)) and len(got) == len(want)
    con.execute(TOKENS_VIEW_SQL)
    assert con.execute("SELECT count(student_lp) FROM tokens").fetchone()[0] > 0


def test_a_q8_shard_of_schema_2_reads_with_its_old_footer(tmp_path):
    """A q8 shard as schema 2 wrote it (every codec key in the footer JSON, no version, `student_logprobs`):
    the data path and the views decode it as they decode today's q8 shards."""
    from offline_opd.train.shard_data import collate

    codec = make_codec("q8", "", 151_936)
    fmt = coded_shard(tmp_path / "new" / shards.part_name(0), codec, 151_936, 8, 40)
    today = pq.read_table(tmp_path / "new" / shards.part_name(0))
    old, schema = legacy(today, tables.teacher_schema(fmt), "2")
    old_codec = {"id_type": "uint32", "logprob_dtype": "", "lp_bits": 8, "lp_step": 16 / 255, "name": "q8"}
    shards.write_shard(tmp_path / "old" / shards.part_name(0), old,
                       {**META, "k": 8, "width": 8, "schema_version": "2", "codec": old_codec}, schema)
    (info,) = shards.open_teacher_shards(tmp_path / "old")
    assert shards.teacher_format([info]) == fmt
    batch = collate(pa.concat_tables(shards.iter_row_groups(info)), fmt)
    want = fmt.decode(today)
    resp = batch["response_mask"]
    np.testing.assert_array_equal(batch["topk_ids"][resp].numpy(), want["topk_ids"])
    np.testing.assert_array_equal(batch["topk_logprobs"][resp].numpy(), want["topk_logprobs"])
    con = connect(f"{tmp_path}/old/*.parquet")
    got = con.execute("SELECT topk_logprobs, behavior_logprob FROM shards ORDER BY sample_id").fetchall()
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]).astype(np.float32),
                                  want["topk_logprobs"].reshape(-1))
