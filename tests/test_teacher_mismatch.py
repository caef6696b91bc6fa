"""σ_Δ between two teachers: the formula on fixed numbers, zero for one model twice, positive for two."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from offline_opd.models.toy import build_char_tokenizer
from offline_opd.contract import shards, tables
from offline_opd.provenance.fingerprint import tokenizer_fingerprint
from offline_opd.tools.teacher_mismatch import main, mismatch_stats
from tests.tiny_models import save_model, swap_token_ids


@pytest.fixture(autouse=True)
def fingerprint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))


def test_formula_on_fixed_numbers():
    a = [np.array([-1.0, -2.0]), np.array([-0.5]), np.array([], dtype=np.float32)]
    b = [np.array([-1.5, -1.0]), np.array([-3.0]), np.array([], dtype=np.float32)]
    # per sequence: |−1+1.5| + |−2+1| = 1.5, |−0.5+3| = 2.5, 0 (empty response)
    got = mismatch_stats(a, b)
    assert got["sigma_delta"] == pytest.approx(math.sqrt((1.5 ** 2 + 2.5 ** 2 + 0) / 3))
    assert got["mean_abs_delta_per_token"] == pytest.approx((0.5 + 1.0 + 2.5) / 3)
    assert (got["sequences"], got["tokens"], got["max_seq_abs_delta"]) == (3, 3, 2.5)
    with pytest.raises(ValueError, match="different numbers of tokens"):
        mismatch_stats(a, b[:2] + [np.array([0.0])])


def write_rollouts(folder, tokenizer_fp, n=5):
    tok = build_char_tokenizer()
    rows = []
    for i, (prompt, response) in enumerate(zip(["1+2=", "33+4=", "5+9=", "8+8=", "70+1="][:n],
                                               ["3", "37", "14", "16", "71"])):
        p = tok(prompt)["input_ids"]
        r = tok.convert_tokens_to_ids(list(response))
        rows.append({"sample_id": f"q{i}#0", "prompt_id": f"q{i}", "input_ids": p + r, "prompt_len": len(p),
                     "behavior_logprob": [-0.5] * len(r)})
    meta = {"kind": "rollouts", "policy_fingerprint": "p" * 16, "tokenizer_fingerprint": tokenizer_fp,
            "backend": "hf", "backend_version": "test", "sampling_temperature": 1.0, "run_key": "r"}
    shards.write_shard(folder / shards.part_name(0), pa.Table.from_pylist(rows), meta, tables.ROLLOUT_SCHEMA)
    return folder


@pytest.fixture
def setup(tmp_path):
    a = save_model(tmp_path / "a", seed=1)
    b = save_model(tmp_path / "b", seed=2)
    return tmp_path, a, b, write_rollouts(tmp_path / "rollouts", tokenizer_fingerprint(a))


def run(a, b, rollouts, out, *extra):
    return main(["--teacher-a", str(a), "--teacher-b", str(b), "--rollouts", str(rollouts), "--out", str(out),
                 "--device", "cpu", *extra])


def test_same_teacher_twice_is_zero_and_different_teachers_are_not(setup):
    root, a, b, rollouts = setup
    same = run(a, a, rollouts, root / "same.json")
    assert same["sigma_delta"] == 0 and same["tokens"] == 1 + 2 + 2 + 2 + 2 and same["sequences"] == 5
    diff = run(a, b, rollouts, root / "diff.json", "--max-rows", "3")
    assert diff["sigma_delta"] > 0 and diff["mean_abs_delta_per_token"] > 0 and diff["sequences"] == 3
    # σ_Δ is at least the mean per-sequence sum (RMS ≥ mean) and recorded with both fingerprints
    assert diff["sigma_delta"] >= diff["mean_seq_abs_delta"] - 1e-12
    saved = json.loads((root / "diff.json").read_text())
    assert saved["teacher_a_fingerprint"] != saved["teacher_b_fingerprint"] and saved["policy_fingerprint"] == "p" * 16


def test_different_tokenizers_are_refused(setup, capsys):
    root, a, _, rollouts = setup
    other = swap_token_ids(save_model(root / "other", seed=3))
    with pytest.raises(SystemExit) as exc:
        run(a, other, rollouts, root / "x.json")
    err = capsys.readouterr().err.splitlines()[-1]
    assert exc.value.code == 2 and err.startswith("error: tokenizers differ")
    assert tokenizer_fingerprint(other) in err and tokenizer_fingerprint(a) in err
    assert not (root / "x.json").exists()
