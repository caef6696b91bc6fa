"""Shard codecs (offline_opd.contract.codec): encode → Parquet → vectorised decode, documented error bounds,
empty slots, footers of every codec version, and the compact codec's storage order."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline_opd.contract import shards, tables
from offline_opd.contract.codec import Compact, Plain, Quantised, codec_from_meta, make_codec
from offline_opd.contract.tables import TeacherFormat

VOCABS = [200, 49_152, 151_936]


def entries(T: int, W: int, vocab: int, seed: int = 0, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids per position (descending log-probs, as the scorer writes them) spread over the whole
    vocabulary and a wide range of distances below the best entry, some slots empty."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, W, replace=False) for _ in range(T)]).astype(np.int64)
    lps = -np.sort(rng.exponential(scale, (T, W)), axis=1).astype(np.float32)
    ids[rng.random((T, W)) < 0.1] = -1
    return ids, np.where(ids < 0, -np.inf, lps).astype(np.float32)


def table_of(fmt: TeacherFormat, rows: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    encoded = [fmt.codec.encode(i, lp)[0] for i, lp in rows]
    cols = {}
    for field in fmt.fields():
        if field.name in encoded[0]:
            cols[field.name] = pa.array([e[field.name].tolist() for e in encoded], field.type)
        elif field.name in ("teacher_logprob", "tail_logprob"):
            cols[field.name] = pa.array([[-1.0] * len(i) for i, _ in rows], field.type)
    return pa.table(cols)


def as_sets(ids: np.ndarray, lps: np.ndarray) -> list[dict[int, float]]:
    """Per position, id -> log-prob of the valid entries (the codecs may store entries in another order)."""
    return [{int(i): float(lp) for i, lp in zip(row_i, row_lp) if i >= 0} for row_i, row_lp in zip(ids, lps)]


@pytest.mark.parametrize("name", ["plain16", "plain32", "q8", "q16", "compact"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_round_trip_is_within_the_documented_bound(name, vocab):
    codec = make_codec(name[:5], "float" + name[5:], vocab) if name.startswith("plain") else \
        make_codec(name, "", vocab)
    W = 12
    fmt = TeacherFormat(codec, W, 0, True)
    rows = [entries(int(t), W, vocab, seed, scale=4.0) for seed, t in enumerate([5, 1, 9, 3, 40])]
    dec = fmt.decode(table_of(fmt, rows))
    ids = np.concatenate([i for i, _ in rows])
    lps = np.concatenate([lp for _, lp in rows])
    got, want = as_sets(dec["topk_ids"], dec["topk_logprobs"]), as_sets(ids, lps)
    assert [set(g) for g in got] == [set(w) for w in want]          # every id back, empties dropped
    assert ((dec["topk_ids"] < 0) == (dec["topk_logprobs"] == -np.inf)).all()
    assert (dec["topk_ids"] < 0).sum() == (ids < 0).sum()
    order = [[w[i] for i in g] for g, w in zip(got, want)]          # the stored values in decoded order
    stored = np.full(dec["topk_logprobs"].shape, -np.inf)
    for r, row in enumerate(order):
        stored[r, np.flatnonzero(dec["topk_ids"][r] >= 0)] = row
    valid = dec["topk_ids"] >= 0
    top = np.where(valid, dec["topk_logprobs"], -np.inf).max(1, initial=-np.inf)
    bound = codec.error_bound(dec["topk_logprobs"], np.where(np.isfinite(top), top, 0.0))
    err = np.where(valid, np.abs(dec["topk_logprobs"].astype(np.float64) - np.where(valid, stored, 0.0)), 0.0)
    checked = valid & np.isfinite(bound)
    assert (err[checked] <= bound[checked]).all(), float((err - bound)[checked].max())
    if name not in ("plain32",):
        assert (err[checked] > bound[checked] / 4).any(), "the bound is tight, not a loose promise"
    if isinstance(codec, Quantised):  # saturated entries are stored at the span: too high, never too low
        sat = valid & ~np.isfinite(bound)
        assert sat.any() == (name == "q8")   # 16 nats span: some of these entries lie below it; 64: none
        assert (dec["topk_logprobs"][sat] >= stored[sat] - codec.lp_step).all()
    if isinstance(codec, Compact):
        assert np.isfinite(bound[valid]).all()                        # no saturation within 204 nats
        for row_ids, row_valid in zip(dec["topk_ids"], valid):        # ascending ids, empty slots last
            n = row_valid.sum()
            assert row_valid[:n].all() and (np.diff(row_ids[:n]) > 0).all()


def test_compact_bound_in_words():
    """The numbers the codec docstring and the README give: 0.0015 nats at the top, 0.017 one nat and 0.15
    ten nats below it, saturation 204 nats below it."""
    c = Compact()
    bound = c.error_bound(np.array([[0.0, -1.0, -10.0, -300.0]]), np.array([0.0]))[0]
    assert bound[:3] == pytest.approx([0.0015, 0.0166, 0.1526], abs=2e-4) and bound[3] == np.inf
    assert c.distances()[-1] == pytest.approx(204, abs=1)


def test_compact_saturates_far_below_the_top_and_keeps_counts_with_their_ids():
    codec = Compact()
    ids = np.array([[5, 2, 9, -1, 7]])
    lps = np.array([[-0.1, -1.0, -30.0, -np.inf, -1.0e4]], np.float32)
    counts = np.array([[0, 3, 2, 0, 0]], np.uint8)
    fmt = TeacherFormat(codec, 5, 4, True)
    scored = type("Scored", (), {"teacher_logprob": np.array([-0.1], np.float32), "topk_ids": ids,
                                 "topk_logprobs": lps, "tail_logprob": np.array([-3.0], np.float32),
                                 "sample_counts": counts})
    rollouts = pa.table({"input_ids": [[1, 2]], "prompt_len": [1]})
    table = tables.scored_table(rollouts, [scored], fmt)
    assert table.column("topk_id_delta").to_pylist() == [[2, 3, 2, 2, 0]]   # 2, 5, 7, 9, then the empty slot
    assert table.column("sample_counts").to_pylist() == [[3, 0, 0, 2, 0]]
    dec = fmt.decode(table)
    np.testing.assert_array_equal(dec["topk_ids"], [[2, 5, 7, 9, -1]])
    want = np.array([-1.0, -0.1, -1.0e4, -30.0])
    bound = codec.error_bound(dec["topk_logprobs"], np.array([-0.1]))[0, :4]
    assert (np.abs(dec["topk_logprobs"][0, :4] - want) <= bound).all()
    assert bound[2] == np.inf and dec["topk_logprobs"][0, 2] == pytest.approx(-0.1 - codec.distances()[-1], abs=1e-3)
    assert dec["topk_logprobs"][0, 4] == -np.inf


def test_every_codec_footer_round_trips_and_old_footers_still_read():
    for codec in (Plain("float16"), Plain("float32"), make_codec("q8", "", 100), make_codec("q16", "", 151_936),
                  Compact()):
        assert codec_from_meta({"codec": codec.to_meta()}, "float16") == codec
        assert json.loads(codec.to_meta())["version"] == 1
    # schema v2 footers: every codec carried every key, and no version
    old_q8 = '{"id_type": "uint8", "logprob_dtype": "", "lp_bits": 8, "lp_step": 0.06274509803921569, "name": "q8"}'
    old_plain = '{"id_type": "int32", "logprob_dtype": "float32", "lp_bits": 0, "lp_step": 0.0, "name": "plain"}'
    assert codec_from_meta({"codec": old_q8}, "float16") == Quantised("q8", 16 / 255, 8, "uint8")
    assert codec_from_meta({"codec": old_plain}, "float16") == Plain("float32")
    assert codec_from_meta({}, "float32") == Plain("float32")     # schema v1: no codec key
    with pytest.raises(ValueError, match="version 2"):
        codec_from_meta({"codec": json.dumps({**Compact().describe(), "version": 2})}, "float16")


def test_a_shard_with_a_newer_codec_is_refused_naming_the_file(tmp_path):
    from tests.tiny_models import teacher_meta, teacher_rows

    rows = teacher_rows(3, 2, 100, seed=0)
    future = json.dumps({"name": "compact", "version": 9})
    shards.write_shard(tmp_path / shards.part_name(0), rows, teacher_meta("a", "b", "c", k=2, codec=future),
                       tables.teacher_schema("float32"))
    with pytest.raises(shards.ShardError, match=rf"{shards.part_name(0)}: footer key opd.codec .*version 9"):
        shards.open_teacher_shards(tmp_path)


def test_entry_weights_are_decoded_from_counts():
    codec = make_codec("q16", "", 50)
    fmt = TeacherFormat(codec, 3, 4, True)
    ids = np.array([[3, 7, -1]])
    lps = np.log(np.array([[0.5, 0.125, 1.0]], dtype=np.float32))
    lps[0, 2] = -np.inf
    table = table_of(fmt, [(ids, lps)]).append_column("sample_counts", pa.array([[0, 3, 0]], pa.list_(pa.uint8())))
    table = table.set_column(table.schema.get_field_index("tail_logprob"), "tail_logprob",
                             pa.array([[np.log(0.375)]], pa.list_(pa.float32())))
    w = fmt.decode(table)["entry_weights"]
    # drawn from the mass outside the top entry: tail 0.375 + drawn 0.125 = 0.5; w = 3 * 0.5 / (4 * 0.125)
    np.testing.assert_allclose(w, [[1.0, 3.0, 1.0]], rtol=1e-3)


def test_compact_columns_are_written_byte_stream_split(tmp_path):
    from tests.tiny_models import teacher_meta, teacher_rows

    rows = teacher_rows(4, 3, 100, seed=1)
    fmt = TeacherFormat(Compact(), 3, 0, True)
    n = [len(x) - p for x, p in zip(rows["input_ids"].to_pylist(), rows["prompt_len"].to_pylist())]
    scored = [type("S", (), {"teacher_logprob": np.zeros(t, np.float32), "tail_logprob": np.zeros(t, np.float32),
                             "topk_ids": np.reshape(i, (t, 3)), "topk_logprobs": np.reshape(lp, (t, 3)),
                             "sample_counts": None})
              for i, lp, t in zip(rows["topk_ids"].to_pylist(), rows["topk_logprobs"].to_pylist(), n)]
    base = rows.select(tables.ROLLOUT_SCHEMA.names)
    path = shards.write_shard(tmp_path / shards.part_name(0), tables.scored_table(base, scored, fmt),
                              teacher_meta("a", "b", "c", k=3, codec=fmt.codec.describe(), width=3),
                              tables.teacher_schema(fmt), fmt.encodings())
    meta = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {meta.column(c).path_in_schema.split(".")[0]: meta.column(c).encodings for c in range(meta.num_columns)}
    for name in ("topk_id_delta", "topk_lp_code", "topk_lp_top"):
        assert "BYTE_STREAM_SPLIT" in encodings[name]
    assert "BYTE_STREAM_SPLIT" not in encodings["teacher_logprob"]
    (info,) = shards.open_teacher_shards(tmp_path)
    assert shards.teacher_format([info]) == fmt
    ids = fmt.decode(pq.read_table(path))["topk_ids"]
    assert [set(r) for r in ids] == [set(r) for r in np.concatenate([np.reshape(i, (-1, 3))
                                                                     for i in rows["topk_ids"].to_pylist()])]
    assert math.isfinite(float(np.abs(fmt.decode(pq.read_table(path))["topk_logprobs"]).max()))
