"""Builders shared by the distill and evaluate tests: tiny local models and synthetic teacher shards.

Everything is built in the test's tmp folder in well under a second: a character-level Llama of a few
thousand parameters and teacher shards whose top-k lists are drawn from random teacher distributions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from pipeline import shards
from pipeline.fingerprint import model_fingerprint, tokenizer_fingerprint
from pipeline.provenance import write_provenance
from pipeline.toy_task import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEACHER_FP = "feedc0de" * 2
FIRST_CHAR_ID = 4  # ids below are <pad>, <bos>, <eos>, <unk>


def tiny_model(path: Path, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=hidden, num_layers=layers, num_heads=2, intermediate_size=2 * hidden,
                        seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pi_ref(path: Path, teacher_fp: str = TEACHER_FP, seed: int = 0) -> Path:
    """A π_ref folder as the sft stage leaves it: model, tokenizer and provenance naming its SFT teacher."""
    tiny_model(path, seed=seed)
    write_provenance(path, "sft", source="scratch", config={}, sft_teacher_fingerprint=teacher_fp,
                     sft_data_files=["part-00000.parquet"])
    return path


def teacher_rows(n: int, k: int, vocab: int, seed: int, start: int = 0) -> pa.Table:
    """Rows of a teacher_topk shard: random prompts and responses, top-k of random teacher distributions."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(start, start + n):
        p, r = int(rng.integers(2, 6)), int(rng.integers(1, 7))
        ids = rng.integers(FIRST_CHAR_ID, vocab, p + r)
        logits = rng.normal(size=(r, vocab)) * 3
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        top = np.argsort(-logp, axis=1, kind="stable")[:, :k]
        rows.append({
            "sample_id": f"s{i:05d}", "prompt_id": f"q{i // 2:05d}", "input_ids": ids.astype(np.int32).tolist(),
            "prompt_len": p,
            "student_logprobs": (-rng.random(r) * 3).astype(np.float32).tolist(),
            "teacher_logprob": logp[np.arange(r), ids[p:]].astype(np.float32).tolist(),
            "topk_ids": top.reshape(-1).astype(np.int32).tolist(),
            "topk_logprobs": np.take_along_axis(logp, top, 1).reshape(-1).astype(np.float32).tolist(),
        })
    return pa.Table.from_pylist(rows)


def write_teacher_shards(folder: Path, init_dir: Path, n_rows: int, rows_per_shard: int, k: int = 4,
                         teacher_fp: str = TEACHER_FP, teacher_path: str = "", seed: int = 0,
                         logprob_dtype: str = "float16") -> list[Path]:
    """teacher_topk shards whose footers say they score rollouts of `init_dir` (π_ref)."""
    vocab = len(build_tokenizer())
    meta = {"kind": "teacher_topk", "teacher_fingerprint": teacher_fp, "teacher_path": teacher_path,
            "policy_fingerprint": model_fingerprint(init_dir), "policy_path": str(init_dir),
            "tokenizer_fingerprint": tokenizer_fingerprint(init_dir), "k": k, "scoring_temperature": 1.0,
            "sampling_temperature": 1.0, "privileged_context": None, "backend": "hf", "backend_version": "test",
            "run_key": "test", "config": {}}
    paths = []
    for i, start in enumerate(range(0, n_rows, rows_per_shard)):
        table = teacher_rows(min(rows_per_shard, n_rows - start), k, vocab, seed + i, start)
        paths.append(shards.write_shard(folder / shards.part_name(i), table, meta,
                                        shards.teacher_schema(logprob_dtype)))
    return paths


def params_file(folder: Path, **distill) -> Path:
    """The repo's params.yaml with `distill` keys overridden (small and fast by default)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["distill"] = {**copy.deepcopy(data["distill"]), "batch_size": 4, "max_steps": 3, "lr": 1e-2,
                       "warmup_frac": 0.0, "checkpoint_every_n_steps": 1, **distill}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
