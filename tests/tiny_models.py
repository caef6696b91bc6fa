"""Tiny Hugging Face models, π_ref folders, synthetic teacher shards and params files for the tests.

Everything is built locally in well under a second (never downloaded): character-level Llamas of a few
thousand parameters, so tests can make as many "different teachers" as they need, and teacher shards
whose top-k lists are drawn from random teacher distributions.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from offline_opd.models.toy import build_char_tokenizer
from offline_opd.models.toy import save_toy_model as save_model  # noqa: F401  (the tests' name for it)
from offline_opd.contract import shards, tables
from offline_opd.contract.codec import Plain
from offline_opd.contract.tables import TeacherFormat
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.provenance.record import write_provenance

REPO = Path(__file__).resolve().parents[1]
TEACHER_FP = "feedc0de" * 2
FIRST_CHAR_ID = 4  # ids below are <pad>, <bos>, <eos>, <unk>


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package), registered in sys.modules under `name`:
    dataclasses look their module up there while they are built."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The `cluster` key of an engine stage's section: one engine in the test's own process.
LOCAL_CLUSTER = {"backend": "local", "address": None, "replicas": 1, "cpus_per_replica": 1, "gpus_per_replica": 0}


def engine_config(backend: str = "hf", batch_size: int = 4, dtype: str = "float32", max_model_len: int = 256):
    """The engine keys of a params section, for tests that build an engine directly."""
    from offline_opd.config import EngineConfig

    return EngineConfig(backend, batch_size, dtype, max_model_len, kv_cache_gib=1.0)


def hf_engine(model_dir: Path, batch_size: int = 4, max_model_len: int = 256):
    """An `hf` engine on the CPU in fp32 (what the numbers of the toy tests are measured against)."""
    from offline_opd.backends.engine import load_engine

    return load_engine(model_dir, engine_config("hf", batch_size, max_model_len=max_model_len), "test", device="cpu")


def swap_token_ids(model_dir: Path, a: str = "0", b: str = "1") -> Path:
    """Give two characters each other's ids: a tokenizer that reads the same text into different ids."""
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec))
    return model_dir


def pi_ref(path: Path, teacher_fp: str = TEACHER_FP, seed: int = 0) -> Path:
    """A π_ref folder as the sft stage leaves it: model, tokenizer and provenance naming its SFT teacher."""
    save_model(path, seed=seed, hidden=32, layers=1)
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
            "behavior_logprob": (-rng.random(r) * 3).astype(np.float32).tolist(),
            "teacher_logprob": logp[np.arange(r), ids[p:]].astype(np.float32).tolist(),
            "tail_logprob": _complement_logsumexp(logp, top).astype(np.float32).tolist(),
            "topk_ids": top.reshape(-1).astype(np.int32).tolist(),
            "topk_logprobs": np.take_along_axis(logp, top, 1).reshape(-1).astype(np.float32).tolist(),
        })
    return pa.Table.from_pylist(rows)


def _complement_logsumexp(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, log of the mass outside `ids`: the exact tail a v2 shard stores."""
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, 1)
    m = rest.max(1, initial=-1e4)
    return np.maximum(m + np.log(np.exp(rest - m[:, None]).sum(1)), -1e4)


def legacy(table: pa.Table, schema: pa.Schema, version: str) -> tuple[pa.Table, pa.Schema]:
    """`table` and `schema` under the column names of schema `version`: to write a shard as older code did."""
    table = table.rename_columns([tables.stored_name(n, version) for n in table.column_names])
    return table, pa.schema([f.with_name(tables.stored_name(f.name, version)) for f in schema])


def plain_format(k: int) -> TeacherFormat:
    """The format of `teacher_rows` tables: plain top-k with the exact tail (what `collate` decodes)."""
    return TeacherFormat(Plain("float32"), width=k, samples=0, exact_tail=True)


def teacher_meta(teacher: str, policy: str, tokenizer: str, k: int = 4, **extra) -> dict:
    return {"kind": "teacher_topk", "teacher_fingerprint": teacher, "policy_fingerprint": policy,
            "tokenizer_fingerprint": tokenizer, "k": k, "scoring_temperature": 1.0, "privileged_context": None,
            "backend": "hf", "backend_version": "test", "run_key": "r", "teacher_path": "t", "policy_path": "p",
            **extra}


def pi_ref_meta(init_dir: Path, k: int = 4, teacher_fp: str = TEACHER_FP, teacher_path: str = "") -> dict:
    """The footer of teacher shards that score rollouts of `init_dir` (π_ref)."""
    return teacher_meta(teacher_fp, model_fingerprint(init_dir), tokenizer_fingerprint(init_dir), k=k,
                        teacher_path=teacher_path, policy_path=str(init_dir), sampling_temperature=1.0,
                        run_key="test", config={})


def write_teacher_shards(folder: Path, meta: dict, n_parts: int = 2, rows_per_part: int = 6,
                         dtype: str = "float16", per_part: dict[int, dict] | None = None,
                         seed: int = 0) -> list[Path]:
    """`n_parts` shards of `rows_per_part` rows (sample ids unique across parts) with footer `meta`,
    part i's footer updated with `per_part[i]`."""
    k, vocab = int(meta["k"]), len(build_char_tokenizer())
    return [shards.write_shard(folder / shards.part_name(i),
                               teacher_rows(rows_per_part, k, vocab, seed + i, start=i * rows_per_part),
                               {**meta, **(per_part or {}).get(i, {})}, tables.teacher_schema(dtype))
            for i in range(n_parts)]


def params_file(folder: Path, **distill) -> Path:
    """The repo's params.yaml with `distill` keys overridden (small and fast by default)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["distill"] = {**copy.deepcopy(data["distill"]), "batch_size": 4, "max_steps": 3, "lr": 1e-2,
                       "warmup_frac": 0.0, "checkpoint_every_n_steps": 1, **distill}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_toy_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """`n` toy additions with their answers at `path`, validated as a stage's --prompts file must be."""
    import pyarrow.parquet as pq

    from offline_opd.contract.prompts import validate_prompts
    from offline_opd.tasks.addition import make_problems

    problems = make_problems(3, n, seed=seed)
    table = pa.table({"prompt_id": [p.prompt_id for p in problems], "prompt": [p.prompt for p in problems],
                      "answer": [p.answer for p in problems]})
    pq.write_table(validate_prompts(table, "test"), path)
    return path


def stage_env(root: Path, n_prompts: int) -> Path:
    """What the engine-stage tests run on: a tiny policy, a wider tiny teacher and `n_prompts` OPD prompts."""
    import torch

    torch.set_num_threads(1)
    save_model(root / "policy", seed=0, hidden=16)
    save_model(root / "teacher", seed=1, hidden=24)
    write_toy_prompts(root / "opd.parquet", n_prompts)
    return root
