"""Depth pruning (`sft.prune_to_layers`) and the pruned student as a wrong teacher: same tokenizer, refused by fingerprint."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from offline_opd.stages import rollouts

from offline_opd.stages import teacher_topk
from offline_opd.backends.base import Sampling
from offline_opd.provenance.consistency import ConsistencyError, check_distill_inputs
from offline_opd.errors import UserError
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.models.loading import build_llama, prune_layers
from offline_opd.models.toy import build_char_tokenizer
from offline_opd.contract.prompts import validate_prompts
from offline_opd.provenance.record import write_provenance
from tests.tiny_models import LOCAL_CLUSTER, REPO, hf_engine, save_model

ENGINE = {"batch_size": 4, "dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1.0, "cluster": LOCAL_CLUSTER}


@pytest.fixture(autouse=True)
def _setup(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))


def pruned_copy(src_model, keep: int, out):
    """`src_model` pruned to `keep` layers and saved with the toy tokenizer (what `sft` starts from)."""
    tok = build_char_tokenizer()
    kept = prune_layers(src_model, keep, "params.yaml: sft.prune_to_layers")
    src_model.save_pretrained(out)
    tok.save_pretrained(out)
    return kept


def test_prune_keeps_first_last_and_evenly_spaced_layers_with_their_weights(tmp_path):
    tok = build_char_tokenizer()
    model = build_llama(tok, 32, 6, 2, 64, seed=0)
    originals = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    kept = pruned_copy(model, 3, tmp_path / "pruned")
    assert kept == [0, 2, 5] and model.config.num_hidden_layers == 3
    for layer, i in zip(model.model.layers, kept):
        assert torch.equal(layer.mlp.up_proj.weight, originals[i])


def test_pruned_model_reloads_and_decodes_with_a_consistent_kv_cache(tmp_path):
    """KV-cached decoding of the saved pruned model gives the log-probs of an uncached forward."""
    pruned_copy(build_llama(build_char_tokenizer(), 32, 5, 2, 64, seed=1), 2, tmp_path / "pruned")
    engine = hf_engine(tmp_path / "pruned")
    assert engine.model.config.num_hidden_layers == 2
    prompt = [1, 20, 21, 22]
    (sample,), = engine.generate([prompt], Sampling(n=1, temperature=1.0, max_new_tokens=8, seed=0))
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + sample.response_ids])).logits[0, len(prompt) - 1:-1]
    ref = torch.log_softmax(logits.float(), -1)[torch.arange(len(sample.response_ids)), sample.response_ids]
    np.testing.assert_allclose(sample.logprobs, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("keep", [0, 7])
def test_prune_refuses_impossible_layer_counts(keep):
    model = build_llama(build_char_tokenizer(), 32, 6, 2, 64, seed=0)
    with pytest.raises(UserError, match="params.yaml: sft.prune_to_layers: .* the model has 6; use 1..6"):
        prune_layers(model, keep, "params.yaml: sft.prune_to_layers")


def test_teacher_topk_pointed_at_the_pruned_student_is_refused_naming_both(tmp_path, capsys):
    """The pruned student shares the teacher's tokenizer, so only fingerprints tell it from the teacher:
    teacher_topk refuses it as a scorer before scoring, naming the teacher π_ref was fine-tuned on and the
    scorer. With the ablation override it scores, and distill's consistency check (without the override)
    still refuses the shards, naming both."""
    teacher = save_model(tmp_path / "teacher", seed=1, hidden=32, layers=4)
    student = tmp_path / "student"
    pruned_copy(build_llama(build_char_tokenizer(), 32, 4, 2, 64, seed=1), 2, student)
    write_provenance(student, "sft", "teacher", {}, sft_teacher_fingerprint=model_fingerprint(teacher),
                     sft_data_files=["part-00000.parquet"])
    assert tokenizer_fingerprint(student) == tokenizer_fingerprint(teacher)
    prompts = validate_prompts(pa.table({"prompt": ["12+34=", "5+6=", "70+8="], "answer": ["46", "11", "78"]}), "t")
    pq.write_table(prompts, tmp_path / "opd.parquet")
    sections = {
        "rollouts": {"backend": "hf", **ENGINE, "max_new_tokens": 6, "temperature": 1.0, "rows_per_shard": 8,
                     "seed": 0, "n_samples": 2, "max_perplexity": None, "resample_budget": 0},
        "teacher_topk": {"backend": "hf", **ENGINE, "k": 3, "logprob_dtype": "float16", "privileged_context": None,
                         "selection": "topk", "samples": 0, "union_student_k": 0, "seed": 0, "codec": "plain"}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(sections))
    common = ["--params", str(params), "--metrics-dir", str(tmp_path / "metrics")]
    rollouts.main(common + ["--policy", str(student), "--prompts", str(tmp_path / "opd.parquet"),
                            "--out", str(tmp_path / "rollouts")])
    score = ["--teacher", str(student), "--rollouts", str(tmp_path / "rollouts"), "--out", str(tmp_path / "topk")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        teacher_topk.main(common + score)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "teacher mismatch" in err
    assert model_fingerprint(student) in err and model_fingerprint(teacher) in err
    assert not list((tmp_path / "topk").glob("part-*"))
    distill = yaml.safe_load((REPO / "params.yaml").read_text())["distill"]
    params.write_text(yaml.safe_dump({**sections, "distill": {**distill, "allow_inconsistent_teacher": True}}))
    teacher_topk.main(common + score)
    with pytest.raises(ConsistencyError) as err:
        check_distill_inputs(student, tmp_path / "topk", allow_inconsistent_teacher=False)
    msg = str(err.value)
    assert "teacher mismatch" in msg
    assert model_fingerprint(student) in msg and model_fingerprint(teacher) in msg
