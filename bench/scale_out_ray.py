"""`teacher_topk` on a Ray Data actor pool: 2 replicas against 1 process, and the stage against a bare forward.

A SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152, tied embeddings;
134.5M parameters) with random weights is built locally from its config (nothing is downloaded) and scores
synthetic rollouts: `--parts` parts of `--rows` sequences, `--prompt-len` + `--response-len` random token
ids, so every part is one engine batch of the same size. Each of `--rounds` rounds runs, one after the other:

1. `teacher_topk` in this process (`cluster.backend: local`): the stage's own `main`, `pool.run_units`
   wrapped by this script to time the engine load and each part apart, and to run next to each part a
   bare forward of it (the model alone over the batches the scorer makes: length-sorted, left-padded,
   logits of the response positions only; no log-softmax, top-k, tail, encoding or writing), alternately
   before and after the part, so a change of load on the shared machine hits both alike;
2. `teacher_topk` on `--replicas` Ray actors of 1 CPU each (`cluster.backend: ray`), on a local Ray cluster
   started once before the first round (its start is reported apart: a standing cluster, `address: ...`,
   pays it once); each round's pool starts its actors and loads the model in them.

Alternating the two in rounds spreads the shared machine's changing load over both. Throughput is
response tokens per second, summed over the rounds. `stage / bare` compares (1)'s parts with their bare
forwards; `ray / local wall` compares whole-stage wall times (engine loads included, bare forwards taken
out; Ray's actors load in parallel); `ray / local steady` leaves start-up out of both: local, the parts
after the first; Ray, the parts finished after the `replicas`-th one (parts' modification times), over
the time since. Every output must decode to the same rows. Torch runs 1 thread per process (the stages'
default). /proc/loadavg is read before, between the runs and after: the ratios mean "idle cores" only
where the load stays near 0. Results go to `--out` under the key `ray` (other keys of that file are kept).

    PYTHONPATH=pipeline:kernels python bench/scale_out_ray.py [--parts 24 --rows 12 --rounds 2] [--out bench/results/scale_out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "pipeline"), str(ROOT / "kernels"), str(ROOT / "bench")]

from train_memory import SMOLLM2_135M  # noqa: E402  (the one copy of the shape, shared with scale_out.py)

from offline_opd.atomic import write_text
from offline_opd.backends.base import Sample
from offline_opd.backends import pool
from offline_opd.backends.generation import left_pad, length_batches
from offline_opd.contract import shards
from offline_opd.contract.footers import RolloutsFooter
from offline_opd.contract.tables import ROLLOUT_SCHEMA, rollout_table
from offline_opd.models.loading import load_model, load_tokenizer
from offline_opd.models.toy import build_char_tokenizer
from offline_opd.provenance.fingerprint import tokenizer_fingerprint
from offline_opd.runtime import run_stage

LOCAL = {"backend": "local", "address": None, "replicas": 1, "cpus_per_replica": 1, "gpus_per_replica": 0}


def build_teacher(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    config = LlamaConfig(**SMOLLM2_135M, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_rollouts(folder: Path, teacher: Path, parts: int, rows: int, prompt_len: int, response_len: int) -> int:
    """Synthetic rollout parts (random ids) whose footers name the teacher's tokenizer; returns response tokens."""
    rng = np.random.default_rng(0)
    footer = RolloutsFooter(backend="hf", backend_version="bench", tokenizer_fingerprint=tokenizer_fingerprint(teacher),
                            run_key="bench", num_parts=parts, policy_fingerprint="bench", sampling_temperature=1.0,
                            policy_path=str(teacher))
    for j in range(parts):
        ids = rng.integers(4, SMOLLM2_135M["vocab_size"], (rows, prompt_len + response_len)).tolist()
        samples = [[Sample(seq[prompt_len:], (-rng.random(response_len)).tolist())] for seq in ids]
        table = rollout_table([f"p{j}-{i}" for i in range(rows)], [seq[:prompt_len] for seq in ids], samples)
        shards.write_shard(folder / shards.part_name(j), table, footer, ROLLOUT_SCHEMA)
    return parts * rows * response_len


class BareForward:
    """The model alone over the batches the scorer makes of one part (length-sorted, left-padded, logits of
    the response positions only): no log-softmax, top-k, tail, encoding or writing."""

    def __init__(self, teacher: Path, rollouts: Path, batch_size: int) -> None:
        self.model, self.pad_id = load_model(teacher, "cpu", "float32"), load_tokenizer(teacher).pad_token_id
        self.parts, self.batch_size = shards.list_parts(rollouts), batch_size

    def __call__(self, j: int) -> float:
        """Seconds of part j's forwards."""
        table = pq.read_table(self.parts[j], columns=["input_ids", "prompt_len"])
        seqs, plens = table["input_ids"].to_pylist(), table["prompt_len"].to_pylist()
        start = time.perf_counter()
        with torch.inference_mode():
            for idx in length_batches([len(s) for s in seqs], self.batch_size):
                ids, mask, positions = left_pad([seqs[i] for i in idx], self.pad_id, self.model.device)
                width = max(len(seqs[i]) - plens[i] for i in idx)
                self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1)
        return time.perf_counter() - start


def timed_local_units(timing: dict, bare: BareForward):
    """The local branch of `run_units`, timed: the engine load apart, and each part next to a bare forward
    of the same part, alternately before and after it, so a load change on the machine hits both alike."""
    def run_units(work, units, cluster, section, noun="part"):
        start = time.perf_counter()
        with work.open() as do:
            timing.update(engine_load_s=time.perf_counter() - start, part_s=[], bare_s=0.0)
            for unit in units:
                if unit % 2 == 0:
                    timing["bare_s"] += bare(unit)
                start = time.perf_counter()
                record = do(unit)
                timing["part_s"].append(time.perf_counter() - start)
                if unit % 2 == 1:
                    timing["bare_s"] += bare(unit)
                yield unit, record
    return run_units


def steady_tokens_per_s(folder: Path, tokens_per_part: int, replicas: int) -> float:
    """Tokens of the parts finished after the `replicas`-th one, over the time since (all parts equal): the
    pool's throughput once every replica has loaded its engine and finished one part."""
    done = sorted(p.stat().st_mtime_ns / 1e9 for p in shards.list_parts(folder))
    later = done[replicas:]
    return len(later) * tokens_per_part / (later[-1] - done[replicas - 1])


def topk_stage(work: Path, teacher: Path, rollouts: Path, out: Path, cluster: dict, batch_size: int, k: int) -> dict:
    params = work / f"params-{out.name}.yaml"
    params.write_text(yaml.safe_dump({"teacher_topk": {
        "backend": "hf", "batch_size": batch_size, "dtype": "float32", "max_model_len": 4096, "kv_cache_gib": 1,
        "cluster": cluster, "k": k, "logprob_dtype": "float16", "privileged_context": None, "selection": "topk",
        "samples": 0, "union_student_k": 0, "seed": 0, "codec": "plain"}}))
    return run_stage("teacher_topk", ["--params", str(params), "--metrics-dir", str(work / f"metrics-{out.name}"),
                                      "--teacher", str(teacher), "--rollouts", str(rollouts), "--out", str(out)])


def rows_of(folder: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in shards.list_parts(folder)).to_pylist()


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def local_round(work: Path, teacher: Path, bare: BareForward, out: Path, args) -> dict:
    """The stage in this process, its parts next to their bare forwards."""
    timing: dict = {}
    real_units, pool.run_units = pool.run_units, timed_local_units(timing, bare)
    try:
        metrics = topk_stage(work, teacher, work / "rollouts", out, LOCAL, args.rows, args.k)
    finally:
        pool.run_units = real_units
    part_s = timing["part_s"]
    return {"wall_s": metrics["wall_s"] - timing["bare_s"],   # the bare forwards run inside it taken out
            "engine_load_s": timing["engine_load_s"], "parts_s": sum(part_s), "bare_forward_s": timing["bare_s"],
            "steady_s": sum(part_s[1:]), "steady_parts": len(part_s) - 1}


def ray_round(work: Path, teacher: Path, out: Path, args, per_part: int) -> dict:
    metrics = topk_stage(work, teacher, work / "rollouts", out, {**LOCAL, "backend": "ray", "replicas": args.replicas},
                        args.rows, args.k)
    steady_tps = steady_tokens_per_s(out, per_part, args.replicas)
    return {"wall_s": metrics["wall_s"], "steady_s": (args.parts - args.replicas) * per_part / steady_tps,
            "steady_parts": args.parts - args.replicas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=24)
    parser.add_argument("--rows", type=int, default=12, help="sequences per part (one engine batch)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=96)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2,
                        help="local and Ray runs, alternately: a load change on a shared machine hits both")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale_out.json"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="scale_out-"))
    teacher = build_teacher(work / "teacher")
    tokens = write_rollouts(work / "rollouts", teacher, args.parts, args.rows, args.prompt_len, args.response_len)
    per_part = tokens // args.parts
    bare = BareForward(teacher, work / "rollouts", args.rows)

    import ray

    load_before = loadavg()
    start = time.perf_counter()
    # A standing cluster for every Ray round (idle between them); each round starts its own actors.
    ray.init(num_cpus=args.replicas, include_dashboard=False, logging_level=logging.WARNING)
    ray_init_s = time.perf_counter() - start
    rounds = []
    try:
        for r in range(args.rounds):
            loads = [loadavg()]
            local = local_round(work, teacher, bare, work / f"local-{r}", args)
            loads.append(loadavg())
            pooled = ray_round(work, teacher, work / f"ray-{r}", args, per_part)
            loads.append(loadavg())
            rounds.append({"loadavg_1min": [x[0] for x in loads], "local": local, "ray": pooled})
            print(f"round {r}: local {local['wall_s']:.1f} s (parts {local['parts_s']:.1f} s, bare forward "
                  f"{local['bare_forward_s']:.1f} s), {args.replicas} Ray replicas {pooled['wall_s']:.1f} s; "
                  f"1-min load {[x[0] for x in loads]}", flush=True)
    finally:
        ray.shutdown()
    load_after = loadavg()
    identical = all(rows_of(work / f"ray-{r}") == rows_of(work / "local-0") == rows_of(work / f"local-{r}")
                    for r in range(args.rounds))

    def total(side: str, key: str) -> float:
        return sum(r[side][key] for r in rounds)

    n = args.rounds
    local_tps, ray_tps = n * tokens / total("local", "wall_s"), n * tokens / total("ray", "wall_s")
    steady_local = n * (args.parts - 1) * per_part / total("local", "steady_s")
    steady_ray = n * (args.parts - args.replicas) * per_part / total("ray", "steady_s")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared VM), torch {torch.__version__}, "
                   f"ray {ray.__version__}, 1 torch thread per process",
        "loadavg_before": load_before, "loadavg_after": load_after,
        "model": "SmolLM2-135M-shaped Llama, random weights, fp32 (134.5M parameters, vocabulary 49152)",
        "workload": {"parts": args.parts, "rows_per_part": args.rows, "prompt_len": args.prompt_len,
                     "response_len": args.response_len, "k": args.k, "response_tokens": tokens},
        "replicas": args.replicas, "ray_init_s": round(ray_init_s, 2),
        "local_tokens_per_s": {"wall": round(local_tps, 1), "steady": round(steady_local, 1),
                               "parts_only": round(n * tokens / total("local", "parts_s"), 1),
                               "bare_forward": round(n * tokens / total("local", "bare_forward_s"), 1)},
        "ray_tokens_per_s": {"wall": round(ray_tps, 1), "steady": round(steady_ray, 1)},
        "ray_vs_local_wall": round(ray_tps / local_tps, 3),
        "ray_vs_local_steady": round(steady_ray / steady_local, 3),
        "stage_vs_bare_forward": round(total("local", "bare_forward_s") / total("local", "parts_s"), 3),
        "per_round": [{"loadavg_1min": r["loadavg_1min"],
                       "ray_vs_local_wall": round(r["local"]["wall_s"] / r["ray"]["wall_s"], 3),
                       "ray_vs_local_steady": round((args.parts - args.replicas) / r["ray"]["steady_s"]
                                                   / ((args.parts - 1) / r["local"]["steady_s"]), 3),
                       "stage_vs_bare_forward": round(r["local"]["bare_forward_s"] / r["local"]["parts_s"], 3),
                       "local_wall_s": round(r["local"]["wall_s"], 1), "ray_wall_s": round(r["ray"]["wall_s"], 1)}
                      for r in rounds],
        "rows_identical": identical,
        "command": "PYTHONPATH=pipeline:kernels python bench/scale_out_ray.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "work")),
    }
    print(json.dumps(result, indent=2))
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    data["ray"] = result
    write_text(args.out, json.dumps(data, indent=2) + "\n")   # the other keys keep their order
    if not identical:
        raise SystemExit("local and Ray outputs differ")


if __name__ == "__main__":
    main()
