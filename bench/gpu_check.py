"""The GPU check (bench/gpu_check.sh): the GPU paths of this project in one run of under 8 minutes on one GPU.

Parts, each in its own process with its own time limit (a part that fails or runs out of time is
reported and the next one runs):

  kernels     bench/bench_sparse_divergence.py, a short setting: two loss-table shapes and the fused
              lm_head comparison (time, bandwidth, peak memory against eager PyTorch)
  fsdp_step   an FSDP2 bf16-mixed training run of a ~1B Llama (Llama-3.2-1B's shape, random weights,
              built here) on 1 GPU through the training stack (tests/fsdp_run.py: meta-device load,
              shard-by-shard weights, fused lm_head + loss, activation checkpointing, AdamW, the
              sharded checkpoint): step throughput and peak GPU memory
  vllm_parity the vllm engine against the hf engine scoring the same sequences on a small model (fp32):
              top-1 agreement and the largest log-prob difference over shared top-k ids; skipped, and
              said so, where vLLM is not installed

`--dry-run` runs the parts on the CPU at tiny sizes (tests/test_gpu_check.py: kernels and fsdp_step in
CI, all three, vLLM's CPU build included, in a slow test): it checks that the script works, not the
GPU. `--parts` picks parts. The summary goes to stdout and to <out>/gpu_check.json.

    bench/gpu_check.sh [--dry-run] [--out DIR] [--parts kernels fsdp_step vllm_parity]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("kernels", "fsdp_step", "vllm_parity")
LIMIT_S = {"kernels": 150, "fsdp_step": 210, "vllm_parity": 120}     # on the GPU: 8 minutes in all, at most
DRY_LIMIT_S = 600                                                    # a shared 2-core CPU is slow, not stuck
# Llama-3.2-1B's shape (its config.json, written out: nothing is downloaded), 1.24B parameters.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
PARITY_K = 5


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("pipeline", "kernels", ""))}


def part_kernels(dry: bool, work: Path) -> dict:
    args = (["--cpu", "--shapes", "128,2048,8", "--reps", "1"] if dry else
            ["--shapes", "4096,32000,8;16384,151936,64", "--rep", "50", "--rep-fused", "100"])
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_sparse_divergence.py"), *args,
                           *([] if dry else ["--json", str(work / "kernels.json")])],
                          env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    result = {"table": proc.stdout.strip().splitlines()[-3:]}
    if not dry:
        data = json.loads((work / "kernels.json").read_text())
        result.update(device=data["device"], copy_peak_gbps=round(data["peak_copy_gbps"]),
                      loss=[{k: r[k] for k in ("N", "V", "k", "ours_ms", "pct_peak", "ours_peak", "eager_ms",
                                               "eager_peak")} for r in data["loss"]],
                      fused={k: data["fused"][k] for k in ("fused_ms", "fused_peak", "unfused_ms", "unfused_peak")})
    return result


def part_fsdp_step(dry: bool, work: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / "llama_1b_shape"
    torch.manual_seed(0)
    with torch.device("cpu" if dry else "cuda"):
        model = LlamaForCausalLM(LlamaConfig(**(TINY if dry else LLAMA_1B))).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    if not dry:
        torch.cuda.empty_cache()
    batch, seq, steps = (2, 32, 2) if dry else (4, 2048, 3)
    cmd = [sys.executable, str(ROOT / "tests" / "fsdp_run.py"), "--model", str(folder), "--out", str(work / "fsdp"),
           "--strategy", "fsdp", "--devices", "1", "--precision", "bf16-mixed", "--checkpointing", "--fused",
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--rows", str(batch * steps),
           "--no-export", "--threads", str(min(8, os.cpu_count() or 1))]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rank = json.loads((work / "fsdp" / "rank0.json").read_text())
    losses = json.loads((work / "fsdp" / "losses.json").read_text())
    return {"params": params, "batch": batch, "seq": seq, "steps": steps, "losses": losses,
            "speed": rank["speed"], "cuda_max_allocated_gib": rank.get("cuda_max_allocated_gib"),
            "param_grad_adam_gib": rank["total_bytes"] / 2**30, "param_dtypes": rank["param_dtypes"],
            "peak_rss_gib": rank["peak_rss_mib"] / 1024}


def part_vllm_parity(dry: bool, work: Path) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"skipped": "vllm is not installed on this machine"}
    import numpy as np

    from offline_opd.backends.engine import load_engine
    from offline_opd.config import EngineConfig
    from offline_opd.models.toy import save_toy_model

    folder = save_toy_model(work / "parity_model", seed=5, hidden=64, layers=2)     # head size 32 (vLLM CPU's minimum)
    device = "cpu" if dry else "cuda"
    cfg = EngineConfig("vllm", 8, "float32", 128, 1.0)
    v = load_engine(folder, cfg, "gpu_check", max_logprobs=PARITY_K, device=device)
    h = load_engine(folder, EngineConfig("hf", 8, "float32", 128, 1.0), "gpu_check", device=device)
    rng = np.random.default_rng(0)
    seqs, plens = [], []
    for _ in range(16):
        p, t = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        seqs.append(rng.integers(4, h.model.config.vocab_size, p + t).tolist())
        plens.append(p)
    try:
        sv, sh = v.score(seqs, plens, PARITY_K), h.score(seqs, plens, PARITY_K)
    finally:
        v.close()
    top1 = float(np.mean(np.concatenate([x.topk_ids[:, 0] == y.topk_ids[:, 0] for x, y in zip(sv, sh)])))
    shared, sampled = [], []
    for x, y in zip(sv, sh):
        sampled.append(float(np.abs(x.teacher_logprob - y.teacher_logprob).max()))
        for t in range(len(x.topk_ids)):
            lx, ly = dict(zip(x.topk_ids[t], x.topk_logprobs[t])), dict(zip(y.topk_ids[t], y.topk_logprobs[t]))
            shared += [abs(lx[i] - ly[i]) for i in set(lx) & set(ly)]
    result = {"device": device, "top1_agreement": top1, "max_abs_dlogprob_shared_topk": float(max(shared)),
              "max_abs_dlogprob_sampled": max(sampled)}
    result["ok"] = top1 >= 0.99 and max(shared) < 1e-3 and max(sampled) < 1e-3
    return result


def run_part(name: str, dry: bool, work: Path) -> dict:
    """`name` in a child process (a GPU part's memory is freed before the next), within its limit."""
    start, limit = time.perf_counter(), DRY_LIMIT_S if dry else LIMIT_S[name]
    cmd = [sys.executable, __file__, "--part", name, "--work", str(work), *(["--dry-run"] if dry else [])]
    try:
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {limit} s"}
    seconds = round(time.perf_counter() - start, 1)
    out = work / f"{name}.result.json"
    if proc.returncode or not out.exists():
        return {"status": "failed", "seconds": seconds, "stderr": proc.stderr[-2000:]}
    result = json.loads(out.read_text())
    status = "skipped" if "skipped" in result else ("failed" if result.get("ok") is False else "ok")
    return {"status": status, "seconds": seconds, **result}


def machine(dry: bool) -> dict:
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "dry_run": dry}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="where gpu_check.json goes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts (default: all)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)       # internal: one part, in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "pipeline"), str(ROOT / "kernels"), str(ROOT)]
    if args.part:
        result = globals()[f"part_{args.part}"](args.dry_run, args.work)
        (args.work / f"{args.part}.result.json").write_text(json.dumps(result, default=str))
        return
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU")
    start = time.perf_counter()
    summary = {"machine": machine(args.dry_run), "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parts:
            print(f"== {name}", flush=True)
            summary["parts"][name] = run_part(name, args.dry_run, Path(tmp))
            print(json.dumps(summary["parts"][name], indent=1, default=str), flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    statuses = {name: part["status"] for name, part in summary["parts"].items()}
    print(f"gpu_check: {statuses} in {summary['seconds']} s -> {args.out / 'gpu_check.json'}")
    sys.exit(0 if all(s in ("ok", "skipped") for s in statuses.values()) else 1)


if __name__ == "__main__":
    main()
