"""Peak memory of one training step of a SmolLM2-135M-shaped (or the toy student's) Llama, against the estimate.

Runs the real training stack's step (offline_opd.train.module.TrainModule: decoder, response-position
gather, the kernels' cross-entropy, backward, AdamW step) for the same global batch four ways: plain,
gradient checkpointing, accumulation (the batch in micro-batches, each normalised by the global token
count), and both. Each configuration runs in its own process so its peak is its own.

Memory: on CUDA, torch.cuda.max_memory_allocated over the step; on CPU, the growth of the process's
peak RSS over its RSS just before the step (weights already built; the step adds gradients, AdamW's
two moments and the activations). Ratios are against the plain run measured in the same invocation. Next to each measurement: the estimate
that training stages refuse a run by (offline_opd.train.resources.step_bytes), against the measured step
plus the weights (the estimate counts them; they were built before the step's baseline).

    python bench/train_memory.py                  # CPU: batch 8 x 256 tokens, about a minute per row
    python bench/train_memory.py --shape toy --batch 2048 --seq 64   # the toy student (configs/toy.yaml sft)
    python bench/train_memory.py --batch 16 --seq 2048 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), written out: nothing is downloaded.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)
# The embedded default's student (configs/toy.yaml, sft:) on the 100-symbol character tokenizer.
TOY_STUDENT = dict(vocab_size=100, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                   rms_norm_eps=1e-6, tie_word_embeddings=True)
SHAPES = {"smollm2": SMOLLM2_135M, "toy": TOY_STUDENT}
RUNS = [("plain", False, 1), ("gradient checkpointing", True, 1), ("accumulation x4", False, 4),
        ("checkpointing + accumulation x4", True, 4)]


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_run(shape: dict, batch: int, seq: int, checkpointing: bool, accumulate: int, device: str) -> dict:
    """One optimizer step over `batch` sequences in `accumulate` micro-batches; peak memory and time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from offline_opd.config import load_section
    from offline_opd.train.examples import Example, collate
    from offline_opd.train.module import TrainModule
    from offline_opd.train.resources import Shape, step_bytes
    from offline_opd.train.supervised import cross_entropy_objective

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device)
    cfg = dataclasses.replace(load_section("sft", ROOT / "configs" / "toy.yaml"), gradient_checkpointing=checkpointing)
    module = TrainModule(model, cfg, cross_entropy_objective())
    opt = module.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(1)
    rows = [Example(torch.randint(0, shape["vocab_size"], (seq,), generator=g).tolist(), seq // 4)
            for _ in range(batch)]
    micro = batch // accumulate
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows[i:i + micro], [], 0).items()}
               for i in range(0, batch, micro)]
    tokens = float(sum(int(b["response_mask"].sum()) for b in batches))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mib()
    start = time.perf_counter()
    for b in batches:
        module.compute_loss(b, (tokens, tokens)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    estimate = step_bytes(Shape.of(model), micro * seq, "32-true", "auto", 1, checkpointing,
                          fused_logits=module.fused_on(torch.device(device)), gpu=device == "cuda")
    return {"params": params, "before_mib": before, "peak_mib": peak, "step_mib": peak - before,
            "weights_mib": params * 4 / 2**20, "estimate_mib": estimate / 2**20,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="smollm2", choices=list(SHAPES),
                        help="smollm2 (SmolLM2-135M, default) or toy (the embedded default's student)")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one configuration, print JSON
    args = parser.parse_args()
    if args.one is not None:
        name, checkpointing, accumulate = RUNS[int(args.one)]
        print(json.dumps(one_run(SHAPES[args.shape], args.batch, args.seq, checkpointing, accumulate, args.device)))
        return
    results = []
    for i, (name, _, _) in enumerate(RUNS):
        out = subprocess.run([sys.executable, __file__, "--one", str(i), "--batch", str(args.batch), "--seq",
                              str(args.seq), "--device", args.device, "--shape", args.shape],
                             capture_output=True, text=True, check=True)
        results.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    params = results[0][1]["params"]
    what = "CUDA max allocated" if args.device == "cuda" else "peak RSS growth over the step"
    print(f"{args.shape}-shaped Llama, {params / 1e6:.2f}M params, fp32 + AdamW, {args.device}, "
          f"one step of {args.batch} x {args.seq} tokens; memory = {what}")
    print(f"{'run':34s} {'step MiB':>9s} {'ratio':>6s} {'peak MiB':>9s} {'estimate MiB':>12s} "
          f"{'est/(step+weights)':>18s} {'seconds':>8s}")
    base = results[0][1]["step_mib"]
    for name, r in results:
        measured = r["step_mib"] + r["weights_mib"]
        print(f"{name:34s} {r['step_mib']:9.0f} {r['step_mib'] / base:6.2f} {r['peak_mib']:9.0f} "
              f"{r['estimate_mib']:12.0f} {r['estimate_mib'] / measured:18.2f} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
