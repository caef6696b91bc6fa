"""distill's teacher-consistency check: right inputs pass, wrong teacher/policy/tokenizer are refused by name."""

import logging
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from offline_opd.contract import shards
from offline_opd.provenance.consistency import ConsistencyError, check_distill_inputs
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.provenance.record import PROVENANCE_FILE, ModelChangedError, write_provenance
from tests.tiny_models import save_model, swap_token_ids, teacher_meta, write_teacher_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fingerprint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def world(tmp_path):
    """A teacher, a π_ref fine-tuned on that teacher's data, and shards it scored: all consistent."""
    teacher = save_model(tmp_path / "teacher", seed=1, hidden=32)
    init = save_model(tmp_path / "student_sft", seed=2)
    write_provenance(init, "sft", "scratch", {}, sft_teacher_fingerprint=model_fingerprint(teacher),
                     sft_data_files=["part-00000.parquet"])
    meta = teacher_meta(model_fingerprint(teacher), model_fingerprint(init), tokenizer_fingerprint(init))
    write_teacher_shards(tmp_path / "teacher_topk", meta, n_parts=3)
    return tmp_path, teacher, init, meta


def rescore(world, **changes):
    """Rewrite the shards as if the teacher_topk stage had run with other inputs."""
    root, _, _, meta = world
    shutil.rmtree(root / "teacher_topk")
    write_teacher_shards(root / "teacher_topk", {**meta, **changes}, n_parts=3)


def copy_with_one_weight_changed(src, dst):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_consistent_inputs_pass_and_report_fingerprints(world):
    root, teacher, init, meta = world
    report = check_distill_inputs(init, root / "teacher_topk", allow_inconsistent_teacher=False)
    assert report["teacher_fingerprint"] == report["sft_teacher_fingerprint"] == model_fingerprint(teacher)
    assert report["policy_fingerprint"] == report["init_fingerprint"] == model_fingerprint(init)
    assert report["tokenizer_fingerprint"] == report["init_tokenizer_fingerprint"]
    assert (report["k"], report["num_shards"], report["num_rows"]) == (4, 3, 18)
    assert report["override_used"] is False and report["mismatches"] == []


def test_same_teacher_copied_elsewhere_passes(world):
    root, teacher, init, _ = world
    copy = root / "elsewhere" / "teacher_copy"
    shutil.copytree(teacher, copy, copy_function=shutil.copy)  # new paths and mtimes, same bytes
    rescore(world, teacher_fingerprint=model_fingerprint(copy))
    assert check_distill_inputs(init, root / "teacher_topk", False)["override_used"] is False


def test_teacher_with_one_changed_weight_is_refused_naming_both(world):
    root, teacher, init, _ = world
    other = copy_with_one_weight_changed(teacher, root / "teacher_edited")
    bad, good = model_fingerprint(other), model_fingerprint(teacher)
    assert bad != good
    rescore(world, teacher_fingerprint=bad)
    start = time.perf_counter()
    with pytest.raises(ConsistencyError) as err:
        check_distill_inputs(init, root / "teacher_topk", False)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "teacher mismatch" in msg and bad in msg and good in msg
    assert "part-00000.parquet (footer opd.teacher_fingerprint" in msg
    assert f"{PROVENANCE_FILE} (sft_teacher_fingerprint, from part-00000.parquet)" in msg
    assert "dvc repro teacher_topk" in msg and "allow_inconsistent_teacher: true" in msg
    assert "\n" not in msg


def test_different_tokenizer_is_refused_even_with_override(world):
    root, _, init, _ = world
    other = swap_token_ids(save_model(root / "other_vocab", seed=1))
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(init)
    rescore(world, tokenizer_fingerprint=tokenizer_fingerprint(other))
    with pytest.raises(ConsistencyError, match="tokenizer mismatch") as err:
        check_distill_inputs(init, root / "teacher_topk", allow_inconsistent_teacher=True)
    assert tokenizer_fingerprint(other) in str(err.value) and tokenizer_fingerprint(init) in str(err.value)


def test_rollouts_from_another_policy_are_refused(world):
    root, _, init, _ = world
    rescore(world, policy_fingerprint=model_fingerprint(save_model(root / "other_policy", seed=7)))
    with pytest.raises(ConsistencyError, match=r"policy \(π_ref\) mismatch.*dvc repro rollouts teacher_topk"):
        check_distill_inputs(init, root / "teacher_topk", False)


def test_pi_ref_edited_after_sft_is_refused(world):
    root, _, init, _ = world
    edited = copy_with_one_weight_changed(init, root / "tmp_edit")
    shutil.copy(edited / "model.safetensors", init / "model.safetensors")
    for allow in (False, True):  # an edited π_ref is never overridable: it is not the model anything recorded
        with pytest.raises(ModelChangedError, match="model.safetensors changed after the `sft` stage.*dvc repro --force sft"):
            check_distill_inputs(init, root / "teacher_topk", allow)


def test_override_runs_warns_and_records(world, caplog):
    root, teacher, init, _ = world
    other = copy_with_one_weight_changed(teacher, root / "teacher_edited")
    rescore(world, teacher_fingerprint=model_fingerprint(other))
    with caplog.at_level(logging.WARNING, logger="opd.consistency"):
        report = check_distill_inputs(init, root / "teacher_topk", allow_inconsistent_teacher=True)
    assert report["override_used"] is True and report["allow_inconsistent_teacher"] is True
    (m,) = report["mismatches"]
    assert (m["check"], m["found"], m["expected"]) == ("teacher", model_fingerprint(other), model_fingerprint(teacher))
    assert any("allow_inconsistent_teacher" in r.message and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("key,value", [("k", 8), ("teacher_fingerprint", "f" * 16), ("scoring_temperature", 0.7)])
def test_shards_disagreeing_name_both_files(world, key, value):
    root, _, init, meta = world
    shutil.rmtree(root / "teacher_topk")
    write_teacher_shards(root / "teacher_topk", meta, n_parts=3, per_part={2: {key: value}})
    with pytest.raises(ConsistencyError, match=rf"shards' {key} mismatch") as err:
        check_distill_inputs(init, root / "teacher_topk", False)
    assert "part-00002.parquet" in str(err.value) and "part-00000.parquet" in str(err.value)


def test_truncated_shard_is_named(world):
    root, _, init, _ = world
    path = root / "teacher_topk" / shards.part_name(1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(shards.ShardError, match=r"part-00001\.parquet"):
        check_distill_inputs(init, root / "teacher_topk", False)


def test_corrupted_row_group_is_named_by_the_check_and_when_streamed(world):
    """Footer intact, data pages garbled: the check refuses the file (its sealed checksum), and a shard
    opened before the damage names the file and row group when streamed (its page CRCs)."""
    root, _, init, _ = world
    path = root / "teacher_topk" / shards.part_name(1)
    info = shards.open_shard(path, "teacher_topk")
    col = pq.ParquetFile(path).metadata.row_group(0).column(2)  # input_ids
    data = bytearray(path.read_bytes())
    start = col.data_page_offset
    data[start:start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match=r"part-00001\.parquet: its bytes do not match the checksum"):
        check_distill_inputs(init, root / "teacher_topk", False)
    with pytest.raises(shards.ShardError, match=r"part-00001\.parquet: row group 0 is unreadable"):
        list(shards.iter_row_groups(info))


def test_missing_provenance_and_missing_shards(world, tmp_path):
    root, _, init, _ = world
    with pytest.raises(shards.ShardError, match="no part-\\*.parquet teacher shards"):
        check_distill_inputs(init, tmp_path / "empty", False)
    (init / PROVENANCE_FILE).unlink()
    with pytest.raises(ConsistencyError, match=f"{PROVENANCE_FILE}: not found"):
        check_distill_inputs(init, root / "teacher_topk", False)


def refuse_model_loading(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the consistency check")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_check_never_loads_a_model(world, monkeypatch):
    root, _, init, _ = world
    refuse_model_loading(monkeypatch)
    start = time.perf_counter()
    check_distill_inputs(init, root / "teacher_topk", False)
    assert time.perf_counter() - start < 0.5


def test_distill_on_another_teachers_shards_fails_fast_before_loading_anything(world, tmp_path, capsys, monkeypatch):
    """The issue's acceptance check at stage level: the default params, shards from a different toy teacher."""
    from offline_opd.stages import distill

    root, teacher, init, _ = world
    other = save_model(root / "other_teacher", seed=5, hidden=32)
    rescore(world, teacher_fingerprint=model_fingerprint(other))
    refuse_model_loading(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        distill.main(["--params", str(REPO / "params.yaml"), "--metrics-dir", str(tmp_path / "metrics"),
                      "--init", str(init), "--shards", str(root / "teacher_topk"), "--out", str(tmp_path / "out"),
                      "--logs", str(tmp_path / "logs"), "--plots", str(tmp_path / "plots")])
    assert time.perf_counter() - start < 2.0
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: teacher mismatch: the shards were scored by teacher")
    assert model_fingerprint(other) in err and model_fingerprint(teacher) in err
    assert not any((tmp_path / d).exists() for d in ("out", "logs", "plots", "metrics"))
