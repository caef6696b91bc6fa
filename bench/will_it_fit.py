"""Per-GPU memory estimate of a training step: the README's "will it fit" table, from a formula.

Model state per parameter: weights + gradients + AdamW's two moments. With fp32 master weights
(precision 32-true or bf16-mixed) that is 4 + 4 + 8 = 16 bytes; with bf16-true, 2 + 2 + 4 = 8 bytes
(AdamW keeps its moments in the parameters' dtype). DDP holds all of it on every GPU; FSDP
FULL_SHARD holds 1/G of it plus one decoder layer gathered at a time.

Activations of one micro-batch of T tokens, in bf16, per decoder layer: about 34·T·h bytes
(Korthikanti et al. 2022, "Reducing Activation Recomputation", without the attention-score term,
which SDPA/flash attention never stores). With per-layer activation checkpointing only each layer's
input (2·T·h bytes) is kept, plus one layer's full activations while it is recomputed. The loss
adds nothing of size T·V: the fused lm_head kernel never materialises the logits. A flat 3 GiB
covers the CUDA context, allocator slack and kernel workspaces. This is an estimate for choosing
settings, not a measurement; bench/train_memory.py measures.

    python bench/will_it_fit.py
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
OVERHEAD = 3 * GIB


@dataclass(frozen=True)
class Shape:
    name: str
    params: float      # total parameters
    hidden: int
    layers: int


MODELS = [Shape("Qwen3-1.7B", 1.72e9, 2048, 28), Shape("Qwen3-8B", 8.19e9, 4096, 36)]


def per_gpu_gib(m: Shape, strategy: str, gpus: int, precision: str, tokens: int, checkpointing: bool) -> float:
    state = m.params * (8 if precision == "bf16-true" else 16)
    if strategy == "fsdp":
        state = state / gpus + 2 * m.params / m.layers    # own shard + one gathered bf16 layer
    layer = 34 * tokens * m.hidden
    acts = m.layers * 2 * tokens * m.hidden + layer if checkpointing else m.layers * layer
    return (state + acts + OVERHEAD) / GIB


def main() -> None:
    tokens = 2 * 4096
    print(f"micro-batch {tokens} tokens (batch_size 2 x 4096), activation checkpointing on unless noted")
    print(f"{'model':11s} {'precision':10s} {'strategy':9s} {'GPUs':>4s} {'GiB/GPU':>8s}")
    rows = [(m, p, s, g, True) for m in MODELS for p in ("bf16-mixed", "bf16-true")
            for s, g in (("ddp", 1), ("fsdp", 2), ("fsdp", 4), ("fsdp", 8))]
    rows.append((MODELS[0], "bf16-mixed", "ddp", 1, False))
    for m, p, s, g, ckpt in rows:
        gib = per_gpu_gib(m, s, g, p, tokens, ckpt)
        note = "" if ckpt else "  (no checkpointing)"
        print(f"{m.name:11s} {p:10s} {s:9s} {g:4d} {gib:8.1f}{note}")


if __name__ == "__main__":
    main()
