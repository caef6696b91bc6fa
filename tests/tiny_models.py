"""Tiny Hugging Face models, tokenizers and synthetic teacher shards for the consistency tests.

Everything is built locally in well under a second (never downloaded), so tests can make as many
"different teachers" as they need.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import shards, toy_task


def save_model(out: Path, seed: int = 0, hidden: int = 16) -> Path:
    """A 2-layer toy Llama with random (seeded) weights plus the toy tokenizer, saved in `out`."""
    tok = toy_task.build_tokenizer()
    toy_task.build_model(tok, hidden, 2, 2, 2 * hidden, seed).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def swap_token_ids(model_dir: Path, a: str = "0", b: str = "1") -> Path:
    """Give two characters each other's ids: a tokenizer that reads the same text into different ids."""
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec))
    return model_dir


def teacher_rows(n_rows: int = 6, k: int = 4, vocab: int = 16, seed: int = 0) -> pa.Table:
    """Random rows with the teacher_topk columns; top-k log-probs sorted descending, as the contract says."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        p, t = int(rng.integers(2, 6)), int(rng.integers(2, 9))
        logits = rng.normal(size=(t, vocab))
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        ids = np.argsort(-logp, axis=1)[:, :k]
        response = rng.integers(0, vocab, t)
        rows.append({
            "sample_id": f"q{i}#0", "prompt_id": f"q{i}",
            "input_ids": np.concatenate([rng.integers(0, vocab, p), response]).astype(np.int32).tolist(),
            "prompt_len": p,
            "student_logprobs": (-rng.random(t)).astype(np.float32).tolist(),
            "teacher_logprob": logp[np.arange(t), response].astype(np.float32).tolist(),
            "topk_ids": ids.reshape(-1).astype(np.int32).tolist(),
            "topk_logprobs": np.take_along_axis(logp, ids, 1).reshape(-1).astype(np.float32).tolist(),
        })
    return pa.Table.from_pylist(rows)


def teacher_meta(teacher: str, policy: str, tokenizer: str, k: int = 4, **extra) -> dict:
    return {"kind": "teacher_topk", "teacher_fingerprint": teacher, "policy_fingerprint": policy,
            "tokenizer_fingerprint": tokenizer, "k": k, "scoring_temperature": 1.0, "privileged_context": None,
            "backend": "hf", "backend_version": "test", "run_key": "r", "teacher_path": "t", "policy_path": "p",
            **extra}


def write_teacher_shards(folder: Path, meta: dict, n_parts: int = 2, dtype: str = "float16",
                         per_part: dict[int, dict] | None = None) -> list[Path]:
    """`n_parts` shards with footer `meta` (part i updated with `per_part[i]`)."""
    k = int(meta["k"])
    return [shards.write_shard(folder / shards.part_name(i), teacher_rows(k=k, seed=i),
                               {**meta, **(per_part or {}).get(i, {})}, shards.teacher_schema(dtype))
            for i in range(n_parts)]
