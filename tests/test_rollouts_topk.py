"""Stages rollouts → teacher_topk on tiny toy models: contract-valid shards, resume, --shard, DuckDB/Polars, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from offline_opd.models.toy import build_char_tokenizer
from offline_opd.stages import rollouts
from offline_opd.contract import shards, tables
from offline_opd.stages import teacher_topk
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.backends.generation import HFGenerator
from offline_opd.backends.scoring import HFScorer
from tests.tiny_models import LOCAL_CLUSTER, hf_engine, stage_env

N_PROMPTS, N_SAMPLES, ROWS_PER_SHARD, K = 7, 2, 4, 3   # 2 prompts per part -> 4 parts, the last one short
ENGINE = {"dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1.0, "cluster": LOCAL_CLUSTER}
ROLLOUTS = {"backend": "hf", "batch_size": 5, **ENGINE, "max_new_tokens": 10, "temperature": 1.0,
            "rows_per_shard": ROWS_PER_SHARD, "seed": 0, "n_samples": N_SAMPLES, "max_perplexity": None,
            "resample_budget": 0}
TOPK = {"backend": "hf", "batch_size": 6, **ENGINE, "k": K, "logprob_dtype": "float16", "privileged_context": None,
        "selection": "topk", "samples": 0, "union_student_k": 0, "seed": 0, "codec": "plain"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    return stage_env(tmp_path_factory.mktemp("stages"), N_PROMPTS)


def without_cluster(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != "cluster"}


# Rejection switched off changes no row, so its keys stay out of the run key and the footer's config,
# which are then exactly what they were before the keys existed.
REJECTION_KEYS = ("max_perplexity", "resample_budget")


def row_settings(section: dict) -> dict:
    return {k: v for k, v in without_cluster(section).items() if k not in REJECTION_KEYS}


def params(root: Path, rollouts_cfg: dict | None = None, topk_cfg: dict | None = None) -> Path:
    path = root / f"params-{len(list(root.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump({"rollouts": {**ROLLOUTS, **(rollouts_cfg or {})},
                                    "teacher_topk": {**TOPK, **(topk_cfg or {})}}))
    return path


def run_rollouts(env: Path, out: Path, *extra: str, **cfg) -> dict:
    return rollouts.main(["--params", str(params(env, rollouts_cfg=cfg)), "--metrics-dir", str(env / "metrics"),
                          "--policy", str(env / "policy"), "--prompts", str(env / "opd.parquet"),
                          "--out", str(out), *extra])


def run_topk(env: Path, rollouts_dir: Path, out: Path, *extra: str, teacher: Path | None = None, **cfg) -> dict:
    return teacher_topk.main(["--params", str(params(env, topk_cfg=cfg)), "--metrics-dir", str(env / "metrics"),
                              "--teacher", str(teacher or env / "teacher"), "--rollouts", str(rollouts_dir),
                              "--out", str(out), *extra])


def folder_contents(folder: Path) -> tuple[list[str], pa.Table, list[dict]]:
    """Part names, all rows, and footers without the file checksum (it covers the encoded bytes): what two equal runs must share."""
    parts = shards.list_parts(folder)
    metas = [{k: v for k, v in shards.read_meta(p).items() if k != "file_sha256"} for p in parts]
    return [p.name for p in parts], pa.concat_tables(pq.read_table(p) for p in parts), metas


@pytest.fixture(scope="module")
def clean_run(env) -> tuple[Path, Path]:
    run_rollouts(env, env / "clean" / "rollouts")
    run_topk(env, env / "clean" / "rollouts", env / "clean" / "topk")
    return env / "clean" / "rollouts", env / "clean" / "topk"


def test_shards_follow_the_contract(env, clean_run):
    rollouts_dir, topk_dir = clean_run
    r_parts, t_parts = shards.list_parts(rollouts_dir), shards.list_parts(topk_dir)
    assert [p.name for p in r_parts] == [p.name for p in t_parts] == [shards.part_name(i) for i in range(4)]
    policy_fp, tok_fp = model_fingerprint(env / "policy"), tokenizer_fingerprint(env / "policy")
    seen_prompts: set[str] = set()
    teacher = hf_engine(env / "teacher", batch_size=1).model
    for rp, tp in zip(r_parts, t_parts):
        r = shards.open_shard(rp, "rollouts", tables.ROLLOUT_SCHEMA)
        t = shards.open_shard(tp, "teacher_topk", tables.teacher_schema("float16"))
        assert r.meta["kind"] == "rollouts" and r.meta["policy_fingerprint"] == policy_fp
        assert r.meta["tokenizer_fingerprint"] == tok_fp and r.meta["policy_path"] == str(env / "policy")
        assert r.meta["sampling_temperature"] == "1.0" and r.meta["backend"] == "hf"
        # The footer's config is the section without `cluster` (where it ran changes no row).
        assert json.loads(r.meta["config"]) == row_settings(ROLLOUTS) and r.meta["backend_version"].startswith("transformers")
        assert not {"rejected_rows", "rejected_response_tokens", "resampled_rows", "dropped_rows"} & set(r.meta)
        for key in ("policy_fingerprint", "policy_path", "tokenizer_fingerprint", "sampling_temperature"):
            assert t.meta[key] == r.meta[key]   # the rollouts' policy fields, unchanged
        assert t.meta["teacher_fingerprint"] == model_fingerprint(env / "teacher")
        assert t.meta["teacher_path"] == str(env / "teacher") and t.meta["k"] == str(K)
        assert t.meta["scoring_temperature"] == "1.0" and t.meta["privileged_context"] == "null"
        assert t.meta["logprob_dtype"] == "float16" and json.loads(t.meta["config"]) == without_cluster(TOPK)
        assert t.meta["engine_dtype"] == r.meta["engine_dtype"] == "float32" and t.meta["max_model_len"] == "256"
        assert t.meta["rollouts_run_key"] == r.meta["run_key"] != t.meta["run_key"]

        rows, scored = pq.read_table(rp).to_pylist(), pq.read_table(tp).to_pylist()
        assert len(rows) <= ROWS_PER_SHARD
        prompts_here = {row["prompt_id"] for row in rows}
        assert not prompts_here & seen_prompts, "a prompt's samples must stay in one part"
        seen_prompts |= prompts_here
        for row, s in zip(rows, scored):
            assert {k: s[k] for k in row} == row, "teacher shards carry the rollout rows unchanged"
            assert row["sample_id"].split("#") == [row["prompt_id"], row["sample_id"][-1]]
            ids, p = row["input_ids"], row["prompt_len"]
            n = len(ids) - p
            assert 1 <= n <= ROLLOUTS["max_new_tokens"] and len(row["behavior_logprob"]) == n
            assert len(s["teacher_logprob"]) == n and len(s["topk_ids"]) == len(s["topk_logprobs"]) == n * K
            lp = np.asarray(s["topk_logprobs"], dtype=np.float32).reshape(n, K)
            assert np.all(np.diff(lp, axis=1) <= 0)
            with torch.no_grad():
                ref = torch.log_softmax(teacher(torch.tensor([ids])).logits[0, p - 1:-1].float(), -1)
            np.testing.assert_allclose(s["teacher_logprob"], ref[torch.arange(n), ids[p:]].numpy(), atol=1e-5)
            np.testing.assert_array_equal(np.reshape(s["topk_ids"], (n, K)), ref.topk(K, -1).indices.numpy())
            np.testing.assert_allclose(lp, ref.topk(K, -1).values.numpy(), atol=2e-2)   # float16 storage
            rest = ref.scatter(1, ref.topk(K, -1).indices, float("-inf"))
            np.testing.assert_allclose(s["tail_logprob"], torch.logsumexp(rest, -1).numpy(), atol=1e-5)
    assert len(seen_prompts) == N_PROMPTS


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_duckdb_and_polars_read_shards_as_they_are(env, clean_run, dtype):
    import duckdb
    import polars as pl

    out = env / f"topk-{dtype}"
    run_topk(env, clean_run[0], out, logprob_dtype=dtype)
    glob = str(out / "*.parquet")
    con = duckdb.connect()
    count, k = con.execute(f"select count(*), avg(len(topk_ids) / (len(input_ids) - prompt_len)) "
                          f"from read_parquet('{glob}')").fetchall()[0]
    assert count == N_PROMPTS * N_SAMPLES and k == K
    arrow = pa.concat_tables(pq.read_table(p) for p in shards.list_parts(out))
    first = np.asarray(arrow.column("topk_logprobs").to_pylist()[0], dtype=np.float32)
    via_duckdb = con.execute(f"select topk_logprobs from read_parquet('{glob}') where sample_id = "
                            f"'{arrow.column('sample_id')[0]}'").fetchall()[0][0]
    np.testing.assert_allclose(np.asarray(via_duckdb, dtype=np.float32), first)
    frame = pl.read_parquet(glob)
    assert frame.height == count
    assert (frame["topk_ids"].list.len() == (frame["input_ids"].list.len() - frame["prompt_len"]) * K).all()


def test_resume_after_a_crash_skips_finished_parts(env, clean_run, monkeypatch):
    out = env / "resume"
    real_write, calls = shards.write_shard, {"write": 0, "generate": 0, "score": 0}

    def crash_after_first(*args, **kwargs):
        calls["write"] += 1
        if calls["write"] == 2:
            raise RuntimeError("simulated crash")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", crash_after_first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_rollouts(env, out / "rollouts")
    assert [p.name for p in shards.list_parts(out / "rollouts")] == ["part-00000.parquet"]
    monkeypatch.setattr(shards, "write_shard", real_write)
    first_mtime = (out / "rollouts" / "part-00000.parquet").stat().st_mtime_ns
    real_generate, real_score = HFGenerator.generate, HFScorer.score

    def counting(name, real):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return real(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(HFGenerator, "generate", counting("generate", real_generate))
    monkeypatch.setattr(HFScorer, "score", counting("score", real_score))
    metrics = run_rollouts(env, out / "rollouts")
    assert calls["generate"] == 3 and metrics["parts_skipped"] == 1
    assert (out / "rollouts" / "part-00000.parquet").stat().st_mtime_ns == first_mtime
    assert folder_contents(out / "rollouts") == folder_contents(clean_run[0])
    assert run_rollouts(env, out / "rollouts")["parts_written"] == 0 and calls["generate"] == 3

    (out / "topk").mkdir()
    shutil.copy(clean_run[1] / "part-00002.parquet", out / "topk")
    run_topk(env, out / "rollouts", out / "topk")
    assert calls["score"] == 3, "the already scored part 2 must not be scored again"
    assert folder_contents(out / "topk") == folder_contents(clean_run[1])


def test_a_part_that_crashed_mid_write_never_looks_finished(env, clean_run, monkeypatch):
    out = env / "midwrite"
    real = pq.write_table

    def half_then_die(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        run_topk(env, clean_run[0], out)
    assert shards.list_parts(out) == [], "a failed write must leave no part-*.parquet"
    monkeypatch.setattr(pq, "write_table", real)
    run_topk(env, clean_run[0], out)
    assert sorted(p.name for p in out.iterdir()) == [shards.part_name(i) for i in range(4)]
    assert folder_contents(out) == folder_contents(clean_run[1])


def test_cluster_settings_keep_finished_parts(env, clean_run):
    """`cluster` decides where parts are computed, never what they hold: it is not in the run key."""
    out = env / "cluster"
    shutil.copytree(clean_run[0], out / "rollouts")
    shutil.copytree(clean_run[1], out / "topk")
    other = {**LOCAL_CLUSTER, "replicas": 7, "cpus_per_replica": 0.5, "gpus_per_replica": 1}
    assert run_rollouts(env, out / "rollouts", cluster=other)["parts_skipped"] == 4
    assert run_topk(env, out / "rollouts", out / "topk", cluster=other)["parts_skipped"] == 4
    assert folder_contents(out / "topk") == folder_contents(clean_run[1])


def test_changed_settings_replace_stale_and_extra_parts(env, clean_run):
    out = env / "stale"
    shutil.copytree(clean_run[0], out / "rollouts")
    shutil.copytree(clean_run[1], out / "topk")
    old_key = shards.read_meta(out / "rollouts" / "part-00000.parquet")["run_key"]
    metrics = run_rollouts(env, out / "rollouts", rows_per_shard=8, temperature=0.7)   # 4 prompts/part: 2 parts
    assert metrics["parts_written"] == 2 and metrics["parts_skipped"] == 0
    names, table, metas = folder_contents(out / "rollouts")
    assert names == ["part-00000.parquet", "part-00001.parquet"] and table.num_rows == N_PROMPTS * N_SAMPLES
    assert {m["run_key"] for m in metas} != {old_key} and len({m["run_key"] for m in metas}) == 1
    assert run_topk(env, out / "rollouts", out / "topk")["parts_written"] == 2
    names, _, metas = folder_contents(out / "topk")
    assert names == ["part-00000.parquet", "part-00001.parquet"]
    assert all(m["sampling_temperature"] == "0.7" for m in metas)


def test_shard_halves_equal_a_full_run(env, clean_run):
    out = env / "halves"
    run_rollouts(env, out / "rollouts", "--shard", "1/2")
    assert [p.name for p in shards.list_parts(out / "rollouts")] == ["part-00001.parquet", "part-00003.parquet"]
    with pytest.raises(SystemExit) as exc:
        run_topk(env, out / "rollouts", out / "topk")   # half the rollouts: refused, not half scored
    assert exc.value.code == 2
    run_rollouts(env, out / "rollouts", "--shard", "0/2")
    assert folder_contents(out / "rollouts") == folder_contents(clean_run[0])
    run_topk(env, out / "rollouts", out / "topk", "--shard", "0/2")
    run_topk(env, out / "rollouts", out / "topk", "--shard", "1/2")
    assert folder_contents(out / "topk") == folder_contents(clean_run[1])


def test_bad_shard_spec_is_a_usage_error(env, capsys):
    with pytest.raises(SystemExit) as exc:
        run_rollouts(env, env / "never", "--shard", "2/2")
    assert exc.value.code == 2 and "0 <= i < n" in capsys.readouterr().err


def test_teacher_with_another_tokenizer_is_refused(env, clean_run, capsys):
    other = env / "other-teacher"
    shutil.copytree(env / "teacher", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]   # same text, different ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exc:
        run_topk(env, clean_run[0], env / "refused", teacher=other)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "tokenizer mismatch" in err
    assert tokenizer_fingerprint(other) in err and tokenizer_fingerprint(env / "policy") in err
    assert shards.list_parts(env / "refused") == []


def test_privileged_context_changes_only_the_teacher_prompt(env, clean_run):
    template = "Answer: {answer}\n{prompt}"
    out = env / "privileged"
    run_topk(env, clean_run[0], out, privileged_context=template)
    tok = build_char_tokenizer()
    answers = dict(zip(*(pq.read_table(env / "opd.parquet").column(c).to_pylist() for c in ("prompt_id", "answer"))))
    prompts = dict(zip(*(pq.read_table(env / "opd.parquet").column(c).to_pylist() for c in ("prompt_id", "prompt"))))
    teacher = hf_engine(env / "teacher", batch_size=1).model
    plain = pq.read_table(clean_run[1] / "part-00000.parquet").to_pylist()
    for row, base in zip(pq.read_table(out / "part-00000.parquet").to_pylist(), plain):
        assert row["input_ids"] == base["input_ids"], "the rows keep the student's prompt"
        prefix = tok(template.format(prompt=prompts[row["prompt_id"]], answer=answers[row["prompt_id"]]))["input_ids"]
        response = row["input_ids"][row["prompt_len"]:]
        with torch.no_grad():
            logits = teacher(torch.tensor([prefix + response])).logits[0, len(prefix) - 1:-1]
        ref = torch.log_softmax(logits.float(), -1)[torch.arange(len(response)), response].numpy()
        np.testing.assert_allclose(row["teacher_logprob"], ref, atol=1e-5)
        assert not np.allclose(row["teacher_logprob"], base["teacher_logprob"])
    assert shards.read_meta(out / "part-00000.parquet")["privileged_context"] == json.dumps(template)


def test_pending_parts_leaves_other_processes_parts_alone(tmp_path):
    """With --shard i/n, process i cleans up only its own parts: another's temporaries are mid-write."""
    (tmp_path / ".part-00001.parquet.tmp-999").write_bytes(b"being written by process 1/2")
    (tmp_path / ".part-00002.parquet.tmp-998").write_bytes(b"left by a crashed 0/2")
    (tmp_path / "part-00004.parquet").write_bytes(b"stale, from a run with more parts")
    plan = shards.pending_parts(tmp_path, "rollouts", "key", n_parts=4, shard=(0, 2))
    assert plan.todo == [0, 2] and [p.name for p in plan.stale] == ["part-00004.parquet"]
    plan.clear_stale()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".part-00001.parquet.tmp-999"]
    assert shards.pending_parts(tmp_path, "rollouts", "key", n_parts=4, shard=(1, 2)).todo == [1, 3]
    assert list(tmp_path.iterdir()) == []


def test_compressed_sampled_union_shards_decode_to_the_teacher(env, clean_run):
    """codec q8 + topk+sampled + π_ref's top ids: every stored entry decodes (data path and DuckDB alike)
    to the teacher's log-prob within half a quantisation step, π_ref's ids are among them, and the
    draw counts add up to the number of draws."""
    from offline_opd.train.shard_data import ROLLOUT_COLUMNS
    from offline_opd.tools.inspect_shards import connect

    out = env / "topk-q8"
    m, union = 5, 2
    run_topk(env, clean_run[0], out, codec="q8", selection="topk+sampled", samples=m, union_student_k=union)
    infos = shards.open_teacher_shards(out)
    fmt = shards.teacher_format(infos)
    assert fmt.codec.name == "q8" and fmt.codec.id_type == "uint8" and fmt.width == K + union + m
    teacher = hf_engine(env / "teacher", batch_size=1).model
    policy = hf_engine(env / "policy", batch_size=1).model
    con = connect(str(out / "*.parquet"))
    for info in infos:
        table = pq.read_table(info.path, columns=ROLLOUT_COLUMNS + [f.name for f in fmt.fields()])
        dec = fmt.decode(table)
        ids, lps, w = dec["topk_ids"], dec["topk_logprobs"], dec["entry_weights"]
        sql = dict(con.execute(f"SELECT sample_id, topk_logprobs FROM shards "
                               f"WHERE filename LIKE '%{info.path.name}'").fetchall())
        start = 0
        for sid, seq, p in zip(table["sample_id"].to_pylist(), table["input_ids"].to_pylist(),
                               table["prompt_len"].to_pylist()):
            n = len(seq) - p
            i, lp = ids[start:start + n], lps[start:start + n]
            np.testing.assert_allclose(np.reshape(sql[sid], (n, fmt.width)), lp, atol=1e-6)
            with torch.no_grad():
                ref = torch.log_softmax(teacher(torch.tensor([seq])).logits[0, p - 1:-1].float(), -1).numpy()
                pol = policy(torch.tensor([seq])).logits[0, p - 1:-1].topk(union, -1).indices.numpy()
            valid = i >= 0
            np.testing.assert_allclose(lp[valid], ref[np.nonzero(valid)[0], i[valid]],
                                       atol=fmt.codec.lp_step / 2 + 1e-5)
            assert all(set(pol[t]) <= set(i[t]) for t in range(n)), "π_ref's own top ids are stored"
            start += n
        counts = np.concatenate(table["sample_counts"].to_pylist()).reshape(-1, fmt.width)
        assert counts.sum(1).tolist() == [m] * len(ids)
        drawn = counts > 0
        assert (w[~drawn] == 1).all() and (w[drawn] > 0).all() and not drawn[:, :K].any()


@pytest.mark.parametrize("cfg, key", [({"selection": "sampled"}, "teacher_topk.samples"),
                                      ({"samples": 3}, "teacher_topk.samples"),
                                      ({"selection": "sampled", "samples": 2, "union_student_k": 1},
                                       "teacher_topk.union_student_k"),
                                      ({"backend": "vllm", "selection": "topk+sampled", "samples": 2},
                                       "teacher_topk.backend")])
def test_inconsistent_selection_keys_are_one_line_errors(env, clean_run, capsys, cfg, key):
    with pytest.raises(SystemExit) as exc:
        run_topk(env, clean_run[0], env / "never", **cfg)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and key in err and err.count("\n") == 0
    assert not (env / "never").exists()


# ---- flawed-prefix rejection (rollouts.max_perplexity, rollouts.resample_budget) ----

def perplexities(folder: Path) -> dict[str, float]:
    """exp(−mean behaviour log-prob) of every stored response, by sample id (numpy, float64)."""
    table = folder_contents(folder)[1]
    return {sid: float(np.exp(-np.mean(np.asarray(lp, dtype=np.float64))))
            for sid, lp in zip(table.column("sample_id").to_pylist(), table.column("behavior_logprob").to_pylist())}


def middle_threshold(ppl: dict[str, float]) -> float:
    """Halfway between the two middle perplexities: half the rows above, none within rounding of it."""
    values = sorted(ppl.values())
    return (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def test_rejection_drops_exactly_the_rows_above_the_threshold_before_the_teacher(env, clean_run):
    ppl = perplexities(clean_run[0])
    threshold = middle_threshold(ppl)
    above = {sid for sid, value in ppl.items() if value > threshold}
    assert 0 < len(above) < len(ppl)
    out = env / "rejected"
    metrics = run_rollouts(env, out / "rollouts", max_perplexity=threshold)
    _, clean, _ = folder_contents(clean_run[0])
    _, kept, metas = folder_contents(out / "rollouts")
    keep = pa.array([sid not in above for sid in clean.column("sample_id").to_pylist()])
    assert kept.equals(clean.filter(keep))   # the same draws, those above the threshold gone
    tokens = {row["sample_id"]: len(row["behavior_logprob"]) for row in clean.to_pylist()}
    assert metrics["rows"] == len(ppl) - len(above) == kept.num_rows
    assert metrics["rejected_rows"] == metrics["dropped_rows"] == len(above) and metrics["resampled_rows"] == 0
    assert metrics["rejected_response_tokens"] == sum(tokens[sid] for sid in above) > 0
    assert sum(int(m["rejected_rows"]) for m in metas) == len(above)   # each part's footer counts its own
    assert sum(int(m["rejected_response_tokens"]) for m in metas) == metrics["rejected_response_tokens"]
    assert all(json.loads(m["config"])["max_perplexity"] == threshold for m in metas)
    run_topk(env, out / "rollouts", out / "topk")
    _, scored, _ = folder_contents(out / "topk")
    assert set(scored.column("sample_id").to_pylist()) == set(ppl) - above   # the teacher never saw them
    _, clean_scored, _ = folder_contents(clean_run[1])
    for got, want in zip(scored.to_pylist(), clean_scored.filter(keep).to_pylist()):
        assert got["sample_id"] == want["sample_id"] and got["topk_ids"] == want["topk_ids"]
        np.testing.assert_allclose(got["teacher_logprob"], want["teacher_logprob"], atol=1e-5)


def test_a_threshold_above_every_row_keeps_todays_rows(env, clean_run):
    """Rejection on but rejecting nothing writes the rows of a run without it; only the settings differ."""
    out = env / "lenient"
    metrics = run_rollouts(env, out, max_perplexity=1e6, resample_budget=2)
    _, table, metas = folder_contents(out)
    _, clean, clean_metas = folder_contents(clean_run[0])
    assert table.equals(clean) and metrics["rejected_rows"] == metrics["rejected_response_tokens"] == 0
    assert all(m["rejected_rows"] == "0" for m in metas)
    assert {m["run_key"] for m in metas} != {m["run_key"] for m in clean_metas}   # on, the keys are settings


def test_resampling_refills_rejected_slots_whatever_the_batch_size(env, clean_run):
    ppl = perplexities(clean_run[0])
    threshold = middle_threshold(ppl)
    above = {sid for sid, value in ppl.items() if value > threshold}
    a = run_rollouts(env, env / "resampled_a", max_perplexity=threshold, resample_budget=3)
    b = run_rollouts(env, env / "resampled_b", max_perplexity=threshold, resample_budget=3, batch_size=1)
    _, table_a, _ = folder_contents(env / "resampled_a")
    _, table_b, _ = folder_contents(env / "resampled_b")
    # the same draws (the log-probs of a batch of 1 differ from a padded batch's in the last bit)
    for column in ("sample_id", "input_ids"):
        assert table_a.column(column).equals(table_b.column(column))
    np.testing.assert_allclose(np.concatenate(table_a.column("behavior_logprob").to_pylist()),
                               np.concatenate(table_b.column("behavior_logprob").to_pylist()), atol=1e-5)
    timing = ("tokens_per_s", "wall_s")
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    got = perplexities(env / "resampled_a")
    assert max(got.values()) <= threshold
    assert a["resampled_rows"] > 0 and a["resampled_rows"] + a["dropped_rows"] == len(above)
    assert a["rows"] == len(ppl) - a["dropped_rows"] and a["rejected_rows"] >= len(above)
    _, clean, _ = folder_contents(clean_run[0])
    first = {r["sample_id"]: r for r in clean.to_pylist()}
    for row in table_a.to_pylist():   # kept draws are the clean run's; refilled slots hold new draws
        sid = row["sample_id"]
        assert (row == first[sid]) == (sid not in above)
