"""Per-GPU memory estimate of a training step: the README's "will it fit" table, from a formula.

The formula is the one training stages refuse a run by (offline_opd.train.resources.step_bytes; its
docstring derives it): model state of 16 bytes per parameter with fp32 masters (8 with bf16-true),
divided by the GPUs under FSDP plus one gathered layer; activations of about 34·T·h bytes per layer
(2·T·h when checkpointed, plus one layer during its recompute); no logits on the fused lm_head path; a
flat 3 GiB for the CUDA context. This is an estimate for choosing settings, not a measurement;
bench/train_memory.py measures.

    python bench/will_it_fit.py
"""

from __future__ import annotations

from offline_opd.train.resources import GIB, Shape, step_bytes

# Qwen3 shapes (config.json of Qwen/Qwen3-1.7B and Qwen3-8B), written out: nothing is downloaded.
MODELS = {"Qwen3-1.7B": Shape(1.72e9, 2048, 28, 151936), "Qwen3-8B": Shape(8.19e9, 4096, 36, 151936)}


def per_gpu_gib(m: Shape, strategy: str, gpus: int, precision: str, tokens: int, checkpointing: bool) -> float:
    return step_bytes(m, tokens, precision, strategy, gpus, checkpointing, fused_logits=True, gpu=True) / GIB


def main() -> None:
    tokens = 2 * 4096
    print(f"micro-batch {tokens} tokens (batch_size 2 x 4096), activation checkpointing on unless noted")
    print(f"{'model':11s} {'precision':10s} {'strategy':9s} {'GPUs':>4s} {'GiB/GPU':>8s}")
    first = next(iter(MODELS))
    rows = [(name, p, s, g, True) for name in MODELS for p in ("bf16-mixed", "bf16-true")
            for s, g in (("ddp", 1), ("fsdp", 2), ("fsdp", 4), ("fsdp", 8))]
    rows.append((first, "bf16-mixed", "ddp", 1, False))
    for name, p, s, g, ckpt in rows:
        gib = per_gpu_gib(MODELS[name], s, g, p, tokens, ckpt)
        note = "" if ckpt else "  (no checkpointing)"
        print(f"{name:11s} {p:10s} {s:9s} {g:4d} {gib:8.1f}{note}")


if __name__ == "__main__":
    main()
