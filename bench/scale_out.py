"""Per-rank memory of FSDP2 (`strategy: fsdp`) on 2 ranks vs 1 rank, SmolLM2-135M-shaped, on CPU over gloo.

A Llama with SmolLM2-135M's config (bench/train_memory.py; random weights, built and saved here, nothing
downloaded) is trained for a few optimizer steps by tests/fsdp_run.py, the training stack as the `sft`
and `distill` stages run it: loaded on the meta device, each rank reading its own shards, AdamW on the
shards. The same global batch runs three ways, each in its own processes:

    plain   strategy auto, 1 process (the model loaded whole by from_pretrained)
    fsdp_1rank    strategy fsdp (FSDP2), 1 rank
    fsdp_2ranks   strategy fsdp (FSDP2), 2 ranks

Per rank it reports, at the fullest optimizer step (AdamW's moments exist from the second step on):
the parameter + gradient + AdamW state bytes the rank holds (counted from its tensors: exact), and its
peak RSS growth over the RSS it had before loading the model (includes activations, the allocator's
slack and the loading itself). The children run with MALLOC_MMAP_THRESHOLD_=1 MiB: otherwise glibc
keeps the freed per-layer all-gather buffers in its heap (measured: +1 GiB of RSS per rank that no
tensor holds), and the RSS would show the allocator, not the training. Ratios are fsdp_2ranks per rank over
fsdp_1rank, from the same invocation. The figures go to bench/results/scale_out.json under the key "fsdp2"
(other keys of that file are kept).

    python bench/scale_out.py                  # 2-core CPU: a few minutes
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
sys.path[:0] = [str(ROOT / "pipeline"), str(ROOT / "kernels"), str(ROOT / "bench"), str(ROOT)]

from train_memory import SMOLLM2_135M  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale_out.json"
RUNS = [("plain", "auto", 1), ("fsdp_1rank", "fsdp", 1), ("fsdp_2ranks", "fsdp", 2)]
MMAP_THRESHOLD = 1 << 20     # bytes: larger allocations are mmapped, and returned to the OS when freed


def build_model(folder: Path) -> None:
    """SmolLM2-135M's architecture with random (seeded) weights, saved as safetensors + a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from offline_opd.models.toy import build_char_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)     # the export would need one; the bench skips the export


def run(model: Path, out: Path, strategy: str, devices: int, global_batch: int, seq: int, steps: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("pipeline", "kernels", ""))}
    cmd = [sys.executable, str(ROOT / "tests" / "fsdp_run.py"), "--model", str(model), "--out", str(out),
           "--strategy", strategy, "--devices", str(devices), "--batch", str(global_batch // devices),
           "--steps", str(steps), "--seq", str(seq), "--rows", str(global_batch * steps), "--no-export"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{strategy} x {devices} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def machine() -> dict:
    mem = {line.split(":")[0]: line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(int(mem["MemTotal"]) / 2**20, 1),
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per optimizer step, all ranks (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2: AdamW state exists)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    import torch

    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "smollm2_135m_shape"
        build_model(model)
        for name, strategy, devices in RUNS:
            start = time.perf_counter()
            results[name] = run(model, Path(tmp) / name, strategy, devices, args.batch, args.seq, args.steps)
            results[name + "_seconds"] = round(time.perf_counter() - start, 1)
    load_after = os.getloadavg()

    def state_mib(rank: dict) -> float:
        return rank["total_bytes"] / 2**20

    def rss_growth(rank: dict) -> float:
        return rank["peak_rss_mib"] - rank["rss_base_mib"]

    params = results["plain"][0]["full_param_elements"]
    print(f"SmolLM2-135M-shaped Llama, {params / 1e6:.1f}M params, fp32 + AdamW, CPU/gloo, {args.steps} steps "
          f"of {args.batch} x {args.seq} tokens (global); torch {torch.__version__}")
    print(f"{'run':8s} {'rank':>4s} {'param+grad+adam MiB':>20s} {'vs 1 rank':>9s} {'peak RSS growth MiB':>20s} "
          f"{'vs 1 rank':>9s} {'placements':>20s}")
    base_state, base_rss = state_mib(results["fsdp_1rank"][0]), rss_growth(results["fsdp_1rank"][0])
    rows = []
    for name, _, devices in RUNS:
        for r, rank in enumerate(results[name]):
            row = {"run": name, "rank": r, "param_grad_adam_mib": round(state_mib(rank), 1),
                   "param_mib": round(rank["param_bytes"] / 2**20, 1),
                   "adam_mib": round(rank["optimizer_bytes"] / 2**20, 1),
                   "state_vs_1rank": round(state_mib(rank) / base_state, 3),
                   "peak_rss_growth_mib": round(rss_growth(rank), 1),
                   "rss_growth_vs_1rank": round(rss_growth(rank) / base_rss, 3),
                   "peak_rss_mib": round(rank["peak_rss_mib"], 1), "placements": rank["placements"]}
            rows.append(row)
            print(f"{name:8s} {r:4d} {row['param_grad_adam_mib']:20.1f} {row['state_vs_1rank']:9.3f} "
                  f"{row['peak_rss_growth_mib']:20.1f} {row['rss_growth_vs_1rank']:9.3f} "
                  f"{','.join(rank['placements']) or '-':>20s}")
    worst = max(r["param_grad_adam_mib"] for r in rows if r["run"] == "fsdp_2ranks")
    print(f"FSDP2 2 ranks / 1 rank per-rank parameter + gradient + AdamW memory: {worst / base_state:.3f} (target ~0.5)")
    print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores")
    if args.no_write:
        return
    record = {
        "what": "peak per-rank parameter + gradient + AdamW state (counted from the tensors) and peak RSS growth, "
                "FSDP2 on 2 gloo ranks vs 1 rank, same global batch, SmolLM2-135M-shaped Llama, fp32",
        "command": " ".join(["python bench/scale_out.py", *sys.argv[1:]]),
        "params": params, "global_batch": args.batch, "seq": args.seq, "steps": args.steps,
        "rows": rows, "seconds": {name: results[name + "_seconds"] for name, _, _ in RUNS},
        "two_ranks_over_one_state": round(worst / base_state, 3),
        "two_ranks_over_one_rss_growth": round(max(r["rss_growth_vs_1rank"] for r in rows if r["run"] == "fsdp_2ranks"), 3),
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "machine": {**machine(), "load_avg_1min_before": round(load_before[0], 2),
                    "load_avg_1min_after": round(load_after[0], 2),
                    "note": "shared VM: other jobs ran at the same time (the load average counts them)"},
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data["fsdp2"] = record
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} (key fsdp2)")


if __name__ == "__main__":
    main()
