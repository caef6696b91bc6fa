"""Shard codecs (offline_opd.contract.codec): encode → Parquet → vectorised decode, error bounds, empty slots."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from offline_opd.contract.codec import LP_STEP, TeacherFormat, encode, make_codec


def entries(T: int, W: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids per position with log-probs over a wide range, some slots empty."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, W, replace=False) for _ in range(T)]).astype(np.int64)
    lps = -np.sort(rng.exponential(3.0, (T, W)), axis=1).astype(np.float32)
    ids[rng.random((T, W)) < 0.1] = -1
    return ids, np.where(ids < 0, -np.inf, lps).astype(np.float32)


def table_of(fmt: TeacherFormat, rows: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    enc = [encode(fmt.codec, i, lp) for i, lp in rows]
    cols = {}
    for field in fmt.fields():
        if field.name in enc[0]:
            cols[field.name] = pa.array([e[field.name].tolist() for e in enc], field.type)
        elif field.name in ("teacher_logprob", "tail_logprob"):
            cols[field.name] = pa.array([[-1.0] * len(i) for i, _ in rows], field.type)
    return pa.table(cols)


@pytest.mark.parametrize("name", ["plain", "q8", "q16"])
@pytest.mark.parametrize("vocab, id_type", [(200, "uint8"), (32_000, "uint16"), (151_936, "uint32")])
def test_round_trip_error_is_within_half_a_step(name, vocab, id_type):
    codec = make_codec(name, "float32", vocab)
    assert codec.id_type == ("int32" if name == "plain" else id_type)
    W = 12
    fmt = TeacherFormat(codec, W, 0, True)
    rows = [entries(int(t), W, vocab, seed) for seed, t in enumerate([5, 1, 9, 3])]
    dec = fmt.decode(table_of(fmt, rows))
    ids = np.concatenate([i for i, _ in rows])
    lps = np.concatenate([lp for _, lp in rows])
    np.testing.assert_array_equal(dec["topk_ids"], ids)
    assert (dec["topk_logprobs"][ids < 0] == -np.inf).all()
    valid = ids >= 0
    best = np.where(valid, lps, -np.inf).max(1, keepdims=True)
    span = {"plain": np.inf, "q16": 64.0, "q8": 16.0}[name]
    kept = valid & (lps >= best - span)       # beyond the span below the best the codes saturate
    err = np.abs(dec["topk_logprobs"][kept] - lps[kept])
    bound = LP_STEP[name] / 2 + 1e-6 if name != "plain" else 0
    assert err.max() <= bound
    if name != "plain":
        assert err.max() > bound / 4, "the quantisation is real, not a float copy"
        far = valid & ~kept
        assert (dec["topk_logprobs"][far] >= (best - span - 1e-4).repeat(W, 1)[far]).all()


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
