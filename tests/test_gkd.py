"""GKD λ mixing (distill.gkd): the schedule's counts, the two-pool stream, the sft_topk stage and the
consistency chain of the teacher's own sequences.

λ = 1 must be today's on-policy run and λ = 0 the run on the teacher's sequences alone, batch for batch
and step for step; the realised mix must follow the schedule within the rounding rule of train/gkd.py
(cumulative on-policy rows within half a row of B·Σλ, every batch within one row of λ·B); the scored
SFT answers must hold the SFT token ids and the teacher's own log-probs; distill must refuse them from
another teacher."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from offline_opd.config import ConfigError, GkdConfig, load_params
from offline_opd.contract import shards, tables
from offline_opd.models.toy import build_char_tokenizer
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.stages import distill as distill_stage
from offline_opd.stages import sft_data as sft_data_stage
from offline_opd.stages import sft_topk as sft_topk_stage
from offline_opd.train.gkd import Mix
from offline_opd.train.shard_data import TeacherShardDataModule, TeacherShardStream
from tests.tiny_models import (LOCAL_CLUSTER, REPO, TEACHER_FP, hf_engine, params_file, pi_ref, pi_ref_meta,
                               save_model, teacher_meta, teacher_rows, write_teacher_shards, write_toy_prompts)

K = 3
OFF_START = 10_000   # off-policy sample ids are s10000 and up, on-policy ones below


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def off_meta(init: Path, k: int = K, teacher_fp: str = TEACHER_FP, writer_fp: str | None = None, **extra) -> dict:
    """The footer `sft_topk` writes: the teacher scored rows that it wrote itself (greedily)."""
    return teacher_meta(teacher_fp, writer_fp or teacher_fp, tokenizer_fingerprint(init), k=k,
                        sampling_temperature=0.0, run_key="off", config={}, source="sft_data", **extra)


def write_off_shards(folder: Path, meta: dict, n_parts: int = 2, rows_per_part: int = 24, seed: int = 100) -> None:
    vocab = len(build_char_tokenizer())
    for i in range(n_parts):
        rows = teacher_rows(rows_per_part, int(meta["k"]), vocab, seed + i, start=OFF_START + i * rows_per_part)
        shards.write_shard(folder / shards.part_name(i), rows, meta, tables.teacher_schema("float16"))


def is_off(sample_id: str) -> bool:
    return int(sample_id[1:]) >= OFF_START


# ---------------------------------------------------------------------------------------------- the schedule

def reference_lambda(step: int, start: float, end: float, ramp_frac: float, max_steps: int) -> float:
    """λ at `step`, written independently of train/gkd.py: linear over the first ramp_frac of max_steps."""
    ramp = ramp_frac * max_steps
    return end if ramp == 0 else start + (end - start) * min(1.0, step / ramp)


@pytest.mark.parametrize("start, end, ramp, batch, accumulate", [
    (0.5, 0.5, 0.0, 64, 1), (0.0, 0.5, 0.3, 64, 1), (1.0, 0.2, 0.5, 7, 3), (0.3, 0.3, 0.0, 5, 2),
    (1.0, 1.0, 0.0, 64, 1), (0.0, 0.0, 0.0, 16, 1)])
def test_realised_mix_follows_the_schedule_within_the_rounding_rule(start, end, ramp, batch, accumulate):
    max_steps = 200
    mix = Mix.of(GkdConfig(start, end, ramp), max_steps, batch, accumulate)
    target, realised = 0.0, 0
    for j in range(max_steps * accumulate):
        lam = reference_lambda(j // accumulate, start, end, ramp, max_steps)
        on = mix.on_policy(j)
        assert 0 <= on <= batch
        assert abs(on - lam * batch) < 1 + 1e-9              # every batch within one row of λ·B
        target += lam * batch
        realised += on
        assert abs(realised - target) <= 0.5 + 1e-9          # the run so far within half a row
    assert realised == mix.cumulative(max_steps * accumulate)
    if start == end and (start * batch).is_integer():   # a constant λ of whole rows: every batch exactly λ·B
        assert {mix.on_policy(j) for j in range(50)} == {int(start * batch)}


def test_resume_offsets_are_the_rows_each_worker_took():
    mix = Mix(0.0, 0.6, 40, batch_size=9, accumulate=2)
    for workers in (1, 2, 3):
        for role in range(workers):
            on, off = mix.counts_before(37, role, workers)
            batches = range(role, 37, workers)
            assert on == sum(mix.on_policy(j) for j in batches) and on + off == 9 * len(batches)


# ---------------------------------------------------------------------------------------------- the stream

@pytest.fixture
def pools(tmp_path, monkeypatch):
    """On-policy shards (48 rows) and off-policy shards (2 parts of 40 rows), row groups of 8."""
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 8)
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=2, rows_per_part=24)
    write_off_shards(tmp_path / "off", off_meta(init), rows_per_part=40)
    return shards.open_teacher_shards(tmp_path / "shards"), shards.open_teacher_shards(tmp_path / "off")


def batches(stream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x["sample_id"] == y["sample_id"]
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[key]), key


def test_lambda_one_is_the_on_policy_stream_and_never_reads_the_off_policy_shards(pools, monkeypatch):
    on, off = pools
    plain = batches(TeacherShardStream(on, 6, seed=2, shuffle_row_groups=2), 20)
    real = shards.iter_row_groups
    monkeypatch.setattr(shards, "iter_row_groups", lambda info, *a, **k: (
        pytest.fail("an off-policy shard was read at λ = 1") if info in off else real(info, *a, **k)))
    mixed = TeacherShardStream(on, 6, seed=2, shuffle_row_groups=2, off_policy=off, mix=Mix(1.0, 1.0, 0, 6))
    assert_same_batches(batches(mixed, 20), plain)


def test_lambda_zero_is_the_off_policy_stream_alone(pools):
    on, off = pools
    alone = batches(TeacherShardStream(off, 6, seed=2, shuffle_row_groups=2), 20)
    mixed = TeacherShardStream(on, 6, seed=2, shuffle_row_groups=2, off_policy=off, mix=Mix(0.0, 0.0, 0, 6))
    assert_same_batches(batches(mixed, 20), alone)
    assert all(is_off(s) for b in alone for s in b["sample_id"])


def test_mixed_batches_take_the_scheduled_rows_in_each_pools_own_order(pools):
    on, off = pools
    mix = Mix(0.0, 0.75, 10, batch_size=8)
    got = batches(TeacherShardStream(on, 8, seed=5, shuffle_row_groups=3, off_policy=off, mix=mix), 25)
    on_order = [s for b in batches(TeacherShardStream(on, 1, seed=5, shuffle_row_groups=3), 200) for s in b["sample_id"]]
    off_order = [s for b in batches(TeacherShardStream(off, 1, seed=5, shuffle_row_groups=3), 200) for s in b["sample_id"]]
    taken_on, taken_off = [], []
    for j, b in enumerate(got):
        flags = [is_off(s) for s in b["sample_id"]]
        assert flags.count(False) == mix.on_policy(j)
        taken_on += [s for s, f in zip(b["sample_id"], flags) if not f]
        taken_off += [s for s, f in zip(b["sample_id"], flags) if f]
    assert taken_on == on_order[:len(taken_on)] and taken_off == off_order[:len(taken_off)]
    assert len(taken_on) == mix.cumulative(25) and len(taken_off) == 25 * 8 - len(taken_on) > 0
    assert all(is_off(s) for s in got[0]["sample_id"])   # λ = 0 at step 0: the teacher's sequences only


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_stream_resumes_without_repeating_or_skipping(pools, tmp_path, workers):
    gkd = GkdConfig(0.2, 0.8, 0.5)

    def module():
        dm = TeacherShardDataModule(tmp_path / "shards", 6, seed=1, shuffle_row_groups=3, num_workers=workers,
                                    off_policy_dir=tmp_path / "off", gkd=gkd, max_steps=30)
        dm.setup()
        return dm

    def take(dm, n):
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(n)]

    full = take(module(), 30)
    first = module()
    head = take(first, 11)
    first.trainer = SimpleNamespace(global_step=11, global_rank=0, world_size=1, accumulate_grad_batches=1)
    second = module()
    second.load_state_dict(first.state_dict())
    assert_same_batches(head + take(second, 19), full)


# ---------------------------------------------------------------------------------------------- distill

@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 8)
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=2, rows_per_part=24)
    write_off_shards(tmp_path / "off", off_meta(init))
    return tmp_path, init


def run_distill(root: Path, init: Path, tag: str = "", shards_dir: str = "shards", off: str | None = "off",
                gkd: tuple[float, float, float] = (1.0, 1.0, 0.0), **distill) -> dict:
    params = params_file(root, gkd=dict(zip(("lambda_start", "lambda_end", "ramp_frac"), gkd)), **distill)
    data = yaml.safe_load(params.read_text())
    data["sft_topk"]["enabled"] = True
    params.write_text(yaml.safe_dump(data))
    return distill_stage.main([
        "--params", str(params), "--metrics-dir", str(root / f"metrics{tag}"), "--init", str(init),
        "--shards", str(root / shards_dir), *(["--off-policy", str(root / off)] if off else []),
        "--out", str(root / f"out{tag}"), "--logs", str(root / f"logs{tag}"), "--plots", str(root / f"plots{tag}")])


def trained(root: Path, tag: str) -> tuple[str, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    return ((root / f"plots{tag}" / "loss.csv").read_text(),
            AutoModelForCausalLM.from_pretrained(root / f"out{tag}").state_dict())


def assert_same_run(root: Path, a: str, b: str) -> None:
    (loss_a, w_a), (loss_b, w_b) = trained(root, a), trained(root, b)
    assert loss_a == loss_b
    for key in w_a:
        assert torch.equal(w_a[key], w_b[key]), key


def test_distill_at_lambda_one_is_todays_run(inputs):
    root, init = inputs
    today = run_distill(root, init, tag="_today", off=None, max_steps=4)
    gkd = run_distill(root, init, tag="_gkd", max_steps=4)
    assert today["gkd_on_policy_frac"] == gkd["gkd_on_policy_frac"] == 1.0
    assert_same_run(root, "_today", "_gkd")


def test_distill_at_lambda_zero_is_the_run_on_the_teachers_sequences_alone(inputs):
    root, init = inputs
    # The same rows as off-policy shards under an on-policy footer: what a plain run on them would train on.
    write_off_shards(root / "as_on", pi_ref_meta(init, k=K))
    metrics = run_distill(root, init, tag="_zero", gkd=(0.0, 0.0, 0.0), max_steps=4)
    run_distill(root, init, tag="_alone", shards_dir="as_on", off=None, max_steps=4)
    assert metrics["gkd_on_policy_frac"] == 0.0 and metrics["gkd_off_policy_rows_per_rank"] == 16
    assert_same_run(root, "_zero", "_alone")


def test_distill_ramp_trains_and_reports_the_realised_mix(inputs):
    root, init = inputs
    metrics = run_distill(root, init, gkd=(0.0, 0.5, 0.5), max_steps=4, batch_size=8)
    on_rows = sum(round(8 * reference_lambda(step, 0.0, 0.5, 0.5, 4)) for step in range(4))   # 0 + 2 + 4 + 4
    assert metrics["steps"] == 4 and on_rows == 10
    assert metrics["gkd_on_policy_frac"] == on_rows / 32 and metrics["gkd_off_policy_rows_per_rank"] == 32 - on_rows


@pytest.mark.parametrize("change, check", [
    ({"teacher_fp": "0" * 16}, "off-policy teacher mismatch"),
    ({"writer_fp": "1" * 16}, "off-policy writer mismatch"),
])
def test_distill_refuses_off_policy_shards_of_another_teacher(tmp_path, monkeypatch, capsys, change, check):
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 8)
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=2, rows_per_part=24)
    write_off_shards(tmp_path / "off", off_meta(init, **change))
    with pytest.raises(SystemExit) as exit_info:
        run_distill(tmp_path, init, gkd=(0.5, 0.5, 0.0))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {check}") and next(iter(change.values())) in err and "part-00000" in err
    assert not (tmp_path / "out").exists()
    metrics = run_distill(tmp_path, init, gkd=(0.5, 0.5, 0.0), allow_inconsistent_teacher=True)
    assert metrics["consistency_override_used"] is True


@pytest.mark.parametrize("meta, check", [
    (lambda init: pi_ref_meta(init, k=K), "off-policy source mismatch"),          # rollouts' shards, not sft_topk's
    (lambda init: off_meta(init, k=K + 1), "off-policy k mismatch"),
])
def test_distill_refuses_off_policy_shards_it_cannot_batch_even_with_the_override(tmp_path, monkeypatch, capsys,
                                                                                   meta, check):
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 8)
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=2, rows_per_part=24)
    write_off_shards(tmp_path / "off", meta(init))
    with pytest.raises(SystemExit) as exit_info:
        run_distill(tmp_path, init, gkd=(0.5, 0.5, 0.0), allow_inconsistent_teacher=True)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {check}")


# ---------------------------------------------------------------------------------------------- params

def params_with(tmp_path: Path, sft_topk: bool = False, **gkd_or_distill) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["sft_topk"]["enabled"] = sft_topk
    for key, value in gkd_or_distill.items():
        (data["distill"]["gkd"] if key in GkdConfig.__dataclass_fields__ else data["distill"])[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("sft_topk, changes, message", [
    (False, {"lambda_start": 0.5, "lambda_end": 0.5}, "distill.gkd.lambda_start: 0.5 trains on the teacher's own "
                                                      "sequences, which sft_topk.enabled: false does not score"),
    (False, {"lambda_end": 0.5, "ramp_frac": 0.2}, "distill.gkd.lambda_end: 0.5 trains on"),
    (True, {"lambda_start": 0.0, "lambda_end": 0.0, "loss": "pg"}, "distill.gkd.lambda_start: 0 mixes in the "
                                                                   "teacher's own sequences, but distill.loss pg"),
    (True, {"lambda_start": 0.0}, "distill.gkd.ramp_frac: 0 holds λ at lambda_end (1) from the first step"),
    (True, {"lambda_end": 1.5}, "distill.gkd.lambda_end: 1.5 is out of range; it must be <= 1"),
    (True, {"ramp_frac": -0.1}, "distill.gkd.ramp_frac: -0.1 is out of range; it must be >= 0"),
])
def test_bad_gkd_settings_name_the_key(tmp_path, sft_topk, changes, message):
    with pytest.raises(ConfigError) as err:
        load_params(params_with(tmp_path, sft_topk, **changes), required=("distill",))
    assert f"params.yaml: {message}" in str(err.value)


def test_sft_topk_refuses_the_union_targets_it_cannot_make(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["sft_topk"]["enabled"] = True
    data["teacher_topk"]["union_student_k"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"params.yaml: sft_topk.enabled: true .*teacher_topk.union_student_k: 2"):
        load_params(tmp_path / "params.yaml", required=("sft_topk",))


def test_a_valid_ramp_loads(tmp_path):
    cfg = load_params(params_with(tmp_path, True, lambda_start=0.0, lambda_end=0.5, ramp_frac=0.25),
                      required=("distill",))["distill"]
    assert cfg.gkd == GkdConfig(0.0, 0.5, 0.25) and cfg.gkd.off_policy


# ---------------------------------------------------------------------------------------------- sft_topk

ENGINE = {"backend": "hf", "batch_size": 5, "dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1.0,
          "cluster": LOCAL_CLUSTER}
SFT_DATA = {**ENGINE, "max_new_tokens": 12, "temperature": 0.0, "rows_per_shard": 4, "seed": 0, "n_prompts": None}
TOPK = {**ENGINE, "batch_size": 6, "k": K, "logprob_dtype": "float16", "privileged_context": None,
        "selection": "topk", "samples": 0, "union_student_k": 0, "seed": 0, "codec": "plain"}


@pytest.fixture(scope="module")
def sft_env(tmp_path_factory) -> Path:
    """A tiny teacher's greedy answers to 7 prompts (2 parts), as the sft_data stage writes them."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sft_topk")
    save_model(root / "teacher", seed=1, hidden=24)
    write_toy_prompts(root / "sft.parquet", 7)
    sft_data_stage.main(["--params", str(sft_params(root)), "--metrics-dir", str(root / "metrics"),
                         "--teacher", str(root / "teacher"), "--prompts", str(root / "sft.parquet"),
                         "--out", str(root / "sft")])
    return root


def sft_params(root: Path, enabled: bool = True, **distill) -> Path:
    path = root / f"params-{len(list(root.glob('params-*')))}.yaml"
    data = {"sft_data": SFT_DATA, "teacher_topk": TOPK, "sft_topk": {"enabled": enabled}}
    if distill:
        data["distill"] = {**yaml.safe_load((REPO / "params.yaml").read_text())["distill"], **distill}
    path.write_text(yaml.safe_dump(data))
    return path


def run_sft_topk(root: Path, out: Path, teacher: Path | None = None, enabled: bool = True, **distill) -> dict:
    return sft_topk_stage.main(["--params", str(sft_params(root, enabled, **distill)),
                                "--metrics-dir", str(root / "metrics"), "--teacher", str(teacher or root / "teacher"),
                                "--sft", str(root / "sft"), "--out", str(out)])


def test_scored_sft_answers_are_the_sft_rows_with_the_teachers_own_log_probs(sft_env):
    out = sft_env / "scored"
    stats = run_sft_topk(sft_env, out)
    assert stats["parts_written"] == 2 and stats["rows"] == 7
    infos = shards.open_teacher_shards(out)    # the teacher shard contract: footers, schema, checksums, one run
    sft_parts = shards.list_parts(sft_env / "sft")
    teacher_fp = model_fingerprint(sft_env / "teacher")
    sft_meta = shards.read_meta(sft_parts[0])
    teacher = hf_engine(sft_env / "teacher", batch_size=1).model
    for info, sft_path in zip(infos, sft_parts, strict=True):
        meta = info.meta
        assert meta["kind"] == "teacher_topk" and meta["source"] == "sft_data"
        assert meta["teacher_fingerprint"] == meta["policy_fingerprint"] == teacher_fp == sft_meta["teacher_fingerprint"]
        assert meta["sft_data_run_key"] == sft_meta["run_key"] and meta["sampling_temperature"] == "0.0"
        assert meta["tokenizer_fingerprint"] == sft_meta["tokenizer_fingerprint"] and meta["k"] == str(K)
        sft_rows, scored = pq.read_table(sft_path).to_pylist(), pq.read_table(info.path).to_pylist()
        assert len(sft_rows) == len(scored)
        for row, s in zip(sft_rows, scored):
            assert s["sample_id"] == f"{row['prompt_id']}#0" and s["prompt_id"] == row["prompt_id"]
            assert s["input_ids"] == row["input_ids"] and s["prompt_len"] == row["prompt_len"]
            ids, p = row["input_ids"], row["prompt_len"]
            n = len(ids) - p
            assert s["behavior_logprob"] == [0.0] * n   # greedy: the writer's point mass
            with torch.no_grad():
                ref = torch.log_softmax(teacher(torch.tensor([ids])).logits[0, p - 1:-1].float(), -1)
            np.testing.assert_allclose(s["teacher_logprob"], ref[torch.arange(n), ids[p:]].numpy(), atol=1e-5)
            np.testing.assert_array_equal(np.reshape(s["topk_ids"], (n, K)), ref.topk(K, -1).indices.numpy())
            np.testing.assert_allclose(np.reshape(s["topk_logprobs"], (n, K)), ref.topk(K, -1).values.numpy(),
                                       atol=2e-2)   # float16 storage
            rest = ref.scatter(1, ref.topk(K, -1).indices, float("-inf"))
            np.testing.assert_allclose(s["tail_logprob"], torch.logsumexp(rest, -1).numpy(), atol=1e-5)
            # Greedy answers: every SFT token is the teacher's own top-1.
            assert [s["topk_ids"][t * K] for t in range(n)] == ids[p:]
    assert run_sft_topk(sft_env, out)["parts_written"] == 0   # resume: every part already finished


def test_disabled_sft_topk_leaves_an_empty_folder(sft_env):
    out = sft_env / "toggled"
    run_sft_topk(sft_env, out)
    assert len(shards.list_parts(out)) == 2
    stats = run_sft_topk(sft_env, out, enabled=False)
    assert stats["enabled"] is False and stats["parts_total"] == 0 and list(out.iterdir()) == []


def test_sft_topk_refuses_a_teacher_that_did_not_write_the_answers(sft_env, capsys):
    other = save_model(sft_env / "other_teacher", seed=2, hidden=24)
    with pytest.raises(SystemExit) as exit_info:
        run_sft_topk(sft_env, sft_env / "wrong", teacher=other)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: teacher mismatch: the scoring teacher is") and model_fingerprint(other) in err
    assert not shards.list_parts(sft_env / "wrong")
    run_sft_topk(sft_env, sft_env / "wrong", teacher=other, allow_inconsistent_teacher=True)   # an ablation
    assert shards.read_meta(shards.list_parts(sft_env / "wrong")[0])["teacher_fingerprint"] == model_fingerprint(other)
