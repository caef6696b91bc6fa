"""The evaluate stage on tiny local models: metrics keys and ranges, determinism, divergences against a
per-token reference, and clear errors for missing models or answers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from offline_opd.stages import evaluate
from offline_opd.models import loading as models_module
from offline_opd.backends.hf import HFEngine
from offline_opd.eval import divergence
from offline_opd.contract.prompts import validate_prompts
from offline_opd.tasks.addition import make_problems
from tests.tiny_models import REPO, save_model


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def setup(tmp_path):
    models = {name: save_model(tmp_path / name, seed=seed, hidden=32, layers=1) for name, seed in
              (("teacher", 1), ("student_sft", 2), ("student_opd", 3))}
    problems = make_problems(digits=2, n=6, seed=0)
    table = validate_prompts(pa.Table.from_pylist([{"prompt_id": p.prompt_id, "prompt": p.prompt, "answer": p.answer}
                                                   for p in problems]), "test")
    pq.write_table(table, tmp_path / "eval.parquet")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(batch_size=4, max_new_tokens=6, n_eval=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path, models


def run_eval(root, models, out="eval.json", **override):
    paths = {**models, **override}
    return evaluate.main([
        "--params", str(root / "params.yaml"), "--metrics-dir", str(root / "metrics"),
        "--teacher", str(paths["teacher"]), "--ref", str(paths["student_sft"]),
        "--student", str(paths["student_opd"]), "--prompts", str(root / "eval.parquet"),
        "--metrics", str(root / out), "--plots", str(root / "plots")])


def test_writes_accuracy_and_divergences_deterministically(setup):
    root, models = setup
    assert run_eval(root, models)["n_eval"] == 5
    first = json.loads((root / "eval.json").read_text())
    assert set(first) == {"teacher", "student_sft", "student_opd", "opd_gain", "n_eval"} and first["n_eval"] == 5
    assert set(first["teacher"]) == {"accuracy"}
    for name in ("student_sft", "student_opd"):
        assert set(first[name]) == {"accuracy", "teacher_agreement", "fkl", "rkl"}
        assert 0.0 <= first[name]["teacher_agreement"] <= 1.0
        assert first[name]["fkl"] > 0 and first[name]["rkl"] > 0   # different random models disagree
    for name in ("teacher", "student_sft", "student_opd"):
        assert 0.0 <= first[name]["accuracy"] <= 1.0
    assert first["opd_gain"] == first["student_opd"]["accuracy"] - first["student_sft"]["accuracy"]
    assert (root / "plots" / "accuracy.csv").read_text().splitlines()[0] == "model,accuracy"
    run_eval(root, models, out="again.json")
    assert json.loads((root / "again.json").read_text()) == first


def test_a_student_identical_to_the_teacher_has_zero_divergence(setup):
    root, models = setup
    run_eval(root, models, student_opd=models["teacher"])
    res = json.loads((root / "eval.json").read_text())
    assert res["student_opd"]["fkl"] == pytest.approx(0, abs=1e-6) and res["student_opd"]["rkl"] == pytest.approx(0, abs=1e-6)
    assert res["student_opd"]["accuracy"] == res["teacher"]["accuracy"]
    assert res["student_opd"]["teacher_agreement"] == 1.0


def test_each_model_is_loaded_once_and_reuse_changes_no_number(setup, monkeypatch):
    """backend hf: the engine's own module serves the divergences (3 loads, not 5), and the metrics equal
    those computed with a separate copy of each module (generation leaves no state behind in it)."""
    root, models = setup
    loads = []
    original = models_module.load_model

    def counting(path, *a, **kw):
        loads.append(Path(path).name)
        return original(path, *a, **kw)

    monkeypatch.setattr(models_module, "load_model", counting)
    run_eval(root, models)
    assert sorted(loads) == sorted(models)
    monkeypatch.setattr(HFEngine, "logits_model", lambda self: copy.deepcopy(self.model))
    run_eval(root, models, out="fresh.json")
    assert json.loads((root / "fresh.json").read_text()) == json.loads((root / "eval.json").read_text())


@pytest.mark.parametrize("chunk", [1 << 26, 1])
def test_divergence_matches_a_per_token_reference(setup, monkeypatch, chunk):
    """Whole batch in one block, and one position per block, both equal the per-token reference."""
    monkeypatch.setattr(divergence, "LOGPROB_CHUNK_ELEMS", chunk)
    _, models = setup
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    student = AutoModelForCausalLM.from_pretrained(models["student_sft"])
    prompts, responses = [[1, 20, 21], [1, 30]], [[40, 41, 2], [50, 51, 52, 53]]
    got = divergence.divergences(teacher, student, prompts, responses, batch_size=2, pad_id=0)
    fkl, rkl, n = 0.0, 0.0, 0
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
            lq = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
        for t in range(len(p), len(p) + len(r)):
            fkl += float((lp[t - 1].exp() * (lp[t - 1] - lq[t - 1])).sum())
            rkl += float((lq[t - 1].exp() * (lq[t - 1] - lp[t - 1])).sum())
            n += 1
    assert got["fkl"] == pytest.approx(fkl / n, rel=1e-4) and got["rkl"] == pytest.approx(rkl / n, rel=1e-4)


def test_missing_model_is_a_clear_error(setup, capsys):
    root, models = setup
    with pytest.raises(SystemExit) as info:
        run_eval(root, models, student_opd=root / "nowhere")
    assert info.value.code == 2
    assert f"model path {root / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (root / "eval.json").exists()
