"""Does a training run fit this machine? Devices and an estimate of one step's memory, checked before training.

A run that cannot fit is refused with one line naming the key, before its first batch is read:
`devices` above the GPUs (or, without a GPU, the CPU cores) this process may use, and a step whose
estimated memory exceeds what the device has (a GPU's total memory; on CPU the RAM available now,
cgroup limits included, against `devices` copies of the step, since DDP on CPU runs them all on this machine).
Without it, `distill.batch_size: 100000` on the toy task was OOM-killed after 69 s at 24 GB, and
`devices: 4` on 2 cores ran 4x slower without a word.

The estimate (`step_bytes`) is the README's "Will it fit" formula (bench/will_it_fit.py prints its table),
plus two terms measured on CPU:

* Model state per parameter: weights + gradients + AdamW's two moments. With fp32 master weights
  (precision 32-true or bf16-mixed) 4 + 4 + 8 = 16 bytes; with bf16-true 2 + 2 + 4 = 8 bytes. DDP holds
  all of it on every device; FSDP holds 1/G of it (G = devices x num_nodes) plus one gathered bf16 decoder
  layer, and with cpu_offload only that layer on the GPU.
* Activations of one micro-batch of T tokens per decoder layer: about 34·T·h bytes in 16-bit
  (Korthikanti et al. 2022, without the attention-score term that SDPA never stores), twice that under
  32-true. With per-layer checkpointing only each layer's input (2·T·h) is kept, plus one layer's full
  activations during its recompute.
* On CPU, 2 KiB per token per layer and 2 KiB per token besides, whatever the width: what a step of the
  toy student measured beyond the formula (bench/train_memory.py --shape toy: 1.7 GiB where 34·T·h gave
  0.9 GiB; negligible for SmolLM2's width, where the formula alone was already 1.1x the measurement).
* Logits: none on the fused lm_head path (CUDA); otherwise one fp32 [T, V] buffer, 4·T·V bytes (the
  kernels write their gradient into it in place).
* A flat 3 GiB on a GPU for the CUDA context, allocator slack and kernel workspaces.

It is an estimate for refusing what cannot fit, not a measurement: bench/train_memory.py measures a step
and prints the estimate beside it (0.8-1.2x the measurement on the two shapes in bench/README.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from offline_opd.config import ConfigError, TrainConfig

GIB = 2**30
GPU_OVERHEAD = 3 * GIB
CPU_TOKEN_LAYER_BYTES = 2048   # measured beyond the formula on CPU (module docstring)
CPU_TOKEN_BYTES = 2048


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: parameter count, hidden size, decoder layers, vocabulary."""

    params: float
    hidden: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, model) -> "Shape":
        config = model.config
        return cls(float(sum(p.numel() for p in model.parameters())), config.hidden_size,
                   config.num_hidden_layers, config.vocab_size)


def step_bytes(shape: Shape, tokens: int, precision: str, strategy: str, devices: int, checkpointing: bool,
               fused_logits: bool, gpu: bool, offload: bool = False) -> float:
    """Estimated peak bytes of one training step on one device, for a micro-batch of `tokens` tokens.

    `devices`: the ranks FSDP shards over (devices x num_nodes); `offload`: FSDP's shards live in CPU memory."""
    state = shape.params * (8 if precision == "bf16-true" else 16)
    if strategy == "fsdp":
        layer = 2 * shape.params / shape.layers                      # one gathered bf16 decoder layer
        state = layer if offload and gpu else state / devices + layer
    width = 2 if precision == "32-true" else 1                       # activation bytes over 16-bit
    layer = 34 * tokens * shape.hidden * width
    acts = shape.layers * 2 * tokens * shape.hidden * width + layer if checkpointing else shape.layers * layer
    if not gpu:
        acts += tokens * (shape.layers * CPU_TOKEN_LAYER_BYTES + CPU_TOKEN_BYTES)
    logits = 0 if fused_logits else 4 * tokens * shape.vocab
    return state + acts + logits + (GPU_OVERHEAD if gpu else 0)


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which taskset and SLURM narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_ram() -> int:
    """Bytes this process can still allocate: MemAvailable, or less if a cgroup (container, SLURM job) caps it."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if limit != "max":
            avail = min(avail, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return avail


def check_fits_machine(cfg: TrainConfig, shape: Shape, longest: int, fused_logits: bool, where: str) -> None:
    """Refuse `cfg` on this machine if its devices are not there or one step cannot fit in memory.

    `longest`: the longest sequence (tokens) in the data, so a micro-batch holds at most batch_size x longest
    tokens; `where` names the params section, e.g. "params.yaml: distill". Multi-node runs are checked per node.
    """
    import torch

    gpu = torch.cuda.is_available()
    have = torch.cuda.device_count() if gpu else cpu_cores()
    what = "visible GPUs" if gpu else "CPU cores available to this process (no GPU)"
    if cfg.devices > have:
        raise ConfigError(f"{where}.devices: {cfg.devices} is more than the {have} {what}; each device is a "
                          f"process, so extra ones only compete for the same hardware: set devices <= {have}")
    tokens = cfg.batch_size * max(longest, 1)
    need = step_bytes(shape, tokens, cfg.precision, cfg.strategy, cfg.devices * cfg.num_nodes,
                      cfg.gradient_checkpointing, fused_logits, gpu, offload=cfg.cpu_offload)
    if gpu:
        room, per = torch.cuda.mem_get_info(0)[1], "per GPU (its total memory)"
    else:
        need, room, per = need * cfg.devices, available_ram(), f"for {cfg.devices} process(es) (RAM available now)"
    if need > room:
        raise ConfigError(
            f"{where}.batch_size: {cfg.batch_size} sequences of up to {longest} tokens need about "
            f"{need / GIB:.1f} GiB for one step {per}, but there are {room / GIB:.1f} GiB; lower batch_size "
            f"(raise accumulate_grad_batches to keep the global batch), or set gradient_checkpointing: true")
