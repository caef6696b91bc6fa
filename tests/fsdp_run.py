"""One training run of the shared stack on a saved model folder, for tests/test_fsdp.py and bench/scale_out.py.

Run as a script (Lightning's launcher starts the other ranks by running the same command again). It
loads the model the way the `sft` and `distill` stages do (`load_for_training`: on the meta device
under strategy fsdp), trains on fixed synthetic examples whose response lengths vary a lot (so a
per-rank mean and the global token mean differ), exports the model with `save_model`, and writes:

    <out>/losses.json        the loss of every optimizer step (rank 0)
    <out>/model/             the exported Hugging Face folder (rank 0)
    <out>/rank<r>.json       what rank r held at its fullest optimizer step: parameter, gradient and
                             AdamW state bytes, the parameters' placements and dtypes; its RSS
                             before loading the model and its peak RSS by then; the CUDA peak (on a
                             GPU) and the training throughput

`--per-rank-mean` trains with a deliberately wrong normalisation (each rank divides by its own token
count, then gradients are averaged over ranks: the usual DDP mean of per-rank means), so a test can
show that the 2-rank vs 1-rank comparison detects it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "pipeline"), str(REPO / "kernels")]      # runnable as a plain script

import pytorch_lightning as pl  # noqa: E402

from offline_opd.config import load_section  # noqa: E402
from offline_opd.train.examples import Example, ExampleDataModule  # noqa: E402
from offline_opd.train.module import TrainModule  # noqa: E402
from offline_opd.train.supervised import cross_entropy_objective  # noqa: E402
from offline_opd.train.trainer import fit, load_for_training, save_model  # noqa: E402


def examples(n: int, vocab: int, seed: int, seq: int = 0) -> list[Example]:
    """Rows of 2-5 prompt tokens and 1-24 response tokens (or `seq` tokens, a quarter of them prompt), each
    row an arithmetic sequence of ids (a random start, a stride of 1-3): learnable, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt, response, stride = 2 + i % 4, 1 + (i * 7) % 24, 1 + i % 3
        if seq:
            prompt, response = seq // 4, seq - seq // 4
        start = int(torch.randint(0, vocab - 4, (1,), generator=g))
        rows.append(Example([4 + (start + j * stride) % (vocab - 4) for j in range(prompt + response)], prompt))
    return rows


class PerRankMean(TrainModule):
    """The wrong normalisation: each rank divides by its own token count (x world size, so that with
    FSDP's mean over ranks the step is the mean of the per-rank means)."""

    def global_norm(self, group_tokens: torch.Tensor) -> tuple[float, float]:
        n = float(max(1, int(group_tokens.sum()))) * self.trainer.world_size
        return n, n


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class HeldMemory(pl.Callback):
    """The most parameter, gradient and AdamW state bytes this rank held at an optimizer step, and the
    process's peak RSS up to then (loading included, the final checkpoint and export not)."""

    def __init__(self) -> None:
        self.peak: dict = {"rss_base_mib": rss_mib()}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        from torch.distributed.tensor import DTensor

        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if isinstance(t, DTensor) else t

        def nbytes(tensors) -> int:
            return sum(local(t).numel() * local(t).element_size() for t in tensors)

        params = list(module.model.parameters())
        now = {"param_bytes": nbytes(params),
               "grad_bytes": nbytes(p.grad for p in params if p.grad is not None),
               "optimizer_bytes": nbytes(v for s in optimizer.state.values() for v in s.values()
                                         if torch.is_tensor(v) and v.dim() > 0)}
        now["total_bytes"] = sum(now.values())
        if now["total_bytes"] >= self.peak.get("total_bytes", 0):
            self.peak = {**now, "param_elements": sum(local(p).numel() for p in params),
                         "full_param_elements": sum(p.numel() for p in params),
                         "placements": sorted({str(p.placements) for p in params if isinstance(p, DTensor)}),
                         "param_dtypes": sorted({str(p.dtype) for p in params}),
                         "rss_base_mib": self.peak["rss_base_mib"],
                         "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", default="fsdp")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank per micro-batch")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--fused", action="store_true", help="the fused lm_head + loss kernel (default: unfused)")
    parser.add_argument("--per-rank-mean", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=0, help="fixed sequence length (default: 3-28 tokens)")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    # grad_clip 0.3: below the gradient norm of these steps (~0.8 at the first), so clipping, a global norm
    # over every rank's shards under FSDP2, acts in every comparison.
    cfg = dataclasses.replace(
        load_section("sft", REPO / "configs" / "toy.yaml"), strategy=args.strategy, devices=args.devices,
        batch_size=args.batch, accumulate_grad_batches=args.accumulate, max_steps=args.steps, lr=1e-2,
        warmup_frac=0.0, precision=args.precision, cpu_offload=args.offload, grad_clip=0.3,
        gradient_checkpointing=args.checkpointing, checkpoint_every_n_steps=args.steps + 1)  # fit's final save only
    held = HeldMemory()
    loaded = load_for_training(args.model, cfg.precision, sharded=cfg.strategy == "fsdp")
    module = (PerRankMean if args.per_rank_mean else TrainModule)(
        loaded.model, cfg, cross_entropy_objective(), fused=args.fused, weights=loaded.weights)
    data = ExampleDataModule(examples(args.rows, loaded.model.config.vocab_size, 3, args.seq), cfg.batch_size,
                             cfg.seed, pad_id=0)
    result = fit(module, data, cfg, args.out / "logs", key="fsdp_run", where="fsdp_run: sft", callbacks=[held])
    rank = result.trainer.global_rank
    cuda = {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}
    (args.out / f"rank{rank}.json").write_text(json.dumps({**held.peak, **cuda, "speed": result.speed()}))
    if not args.no_export:
        save_model(result, args.out / "model", loaded.stored_dtype,
                   AutoTokenizer.from_pretrained(args.model).save_pretrained)
    if rank == 0:
        (args.out / "losses.json").write_text(json.dumps([loss for _, loss in module.loss_history]))


if __name__ == "__main__":
    main()
