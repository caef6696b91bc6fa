"""Online OPD baseline (issue 9): `distill` with the teacher in the training process. A comparison, not a stage.

Everything but the source of the targets is `distill`'s: the same TrainModule, objective
(distill.loss, loss_params, ...), optimizer, schedule and number of optimizer steps. Instead of reading
precomputed shards, every micro-batch is made fresh: the *current* student samples
`rollouts.n_samples` responses for `distill.batch_size // rollouts.n_samples` prompts (the rollouts
section's temperature and max_new_tokens, HF generation on the training weights), and the teacher,
loaded here with teacher_topk's engine settings, scores them with its k. The rows go through the same table builders and the
same `collate` as the shards, so the loss sees exactly the batch format `distill` sees, and each step
has the same number of sequences. Only plain top-k teacher targets are supported (no sampled
selection, privileged context or union with the student's top ids).

It is not in dvc.yaml: `python -m offline_opd.tools.online_distill --init data/models/student_sft --teacher
data/models/teacher --prompts data/prompts/opd.parquet --out DIR --logs DIR` (bench/ drives it for the
offline-vs-online comparison). A rerun does not resume a previous run's sampling: the fresh samples
depend on the weights, so the logs folder must be new or its checkpoint is discarded.

Its metrics break the run's wall and CPU seconds down by phase (`phases`: load, generate, score, train; the
rest of `online_wall_s` is Lightning's setup, checkpoints between steps and saving), with the tokens each
phase handled, so `bench/cost.py` compares it with offline OPD phase by phase instead of by one total.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import random
import time
from pathlib import Path
from typing import Any, Iterator

from offline_opd.config import DistillConfig, RolloutsConfig, TeacherTopkConfig, load_params
from offline_opd.errors import UserError
from offline_opd.runtime import cli, stage_main
from offline_opd.train.data import ResumableDataModule

PHASES = ("load", "generate", "score", "train")


class Phases:
    """Wall and CPU seconds accumulated per phase: two clock reads per timed block, cheap next to a step.
    CPU seconds are the process's (all its threads): on a shared machine wall time alone mixes in the load."""

    def __init__(self) -> None:
        self.seconds = {name: [0.0, 0.0] for name in PHASES}
        self._open: tuple[float, float] | None = None

    def start(self) -> None:
        """Open the one block timed across two callbacks (a training batch); `stop(name)` closes it."""
        self._open = (time.perf_counter(), time.process_time())

    def stop(self, name: str) -> None:
        wall, cpu = self._open
        self.seconds[name][0] += time.perf_counter() - wall
        self.seconds[name][1] += time.process_time() - cpu
        self._open = None

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name][0] += time.perf_counter() - wall
            self.seconds[name][1] += time.process_time() - cpu

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: {"wall_s": round(w, 4), "cpu_s": round(c, 4)} for name, (w, c) in self.seconds.items()}


def phase_timer(phases: Phases) -> Any:
    """A Lightning callback timing each training batch (forward, backward, optimizer step, and the
    checkpoint written at its end) as the `train` phase; fetching the batch (generate, score) is outside it."""
    import pytorch_lightning as pl

    class PhaseTimer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            phases.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            phases.stop("train")

    return PhaseTimer()


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", type=Path, required=True, help="π_ref, the student to start from")
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher, loaded in this process")
    parser.add_argument("--prompts", type=Path, required=True, help="prompt parquet (as `rollouts` reads)")
    parser.add_argument("--out", type=Path, required=True, help="where the trained student is written")
    parser.add_argument("--logs", type=Path, required=True, help="training logs and checkpoints")
    parser.add_argument("--sampler", choices=("student", "init"), default="student",
                        help="who samples each step's responses: the current student (online OPD, the default), "
                             "or a frozen copy of --init (fresh off-policy samples every step: a diagnostic that "
                             "separates sampling freshly from sampling on-policy)")


class OnlineBatches(ResumableDataModule):
    """Micro-batches sampled by the module's current weights and scored by the teacher, one at a time.

    `prompts`: (prompt ids, prompt token ids); cycled in a seeded random order, epoch after epoch.
    `frozen_sampler`: sample with these fixed weights instead of the module's current ones (`--sampler init`).
    """

    def __init__(self, module: Any, prompts: tuple[list[str], list[list[int]]], tokenizer: Any, scorer: Any,
                 fmt: Any, cfg: DistillConfig, rollouts: RolloutsConfig, k: int, phases: Phases,
                 frozen_sampler: Any = None) -> None:
        super().__init__()
        if cfg.batch_size < rollouts.n_samples:
            raise UserError(f"distill.batch_size: {cfg.batch_size} is below rollouts.n_samples "
                            f"({rollouts.n_samples}); online OPD samples n_samples responses per prompt")
        self.module, self.prompts, self.tokenizer, self.scorer = module, prompts, tokenizer, scorer
        self.fmt, self.cfg, self.rollouts, self.k = fmt, cfg, rollouts, k
        self.frozen_sampler = frozen_sampler
        self.per_batch = cfg.batch_size // rollouts.n_samples
        self.phases = phases
        self.tokens = {"sequences": 0, "generated_tokens": 0, "scored_tokens": 0}

    def layout(self) -> dict[str, Any]:
        return {"online": True, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed}

    def longest_sequence(self) -> int:
        """A sampled sequence is at most its prompt plus rollouts.max_new_tokens."""
        return max(map(len, self.prompts[1]), default=0) + self.rollouts.max_new_tokens

    def train_dataloader(self):
        return self.grouped(self._batches())

    def _order(self) -> Iterator[int]:
        n = len(self.prompts[0])
        for epoch in itertools.count():
            order = list(range(n))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            yield from order

    def _batches(self) -> Iterator[dict[str, Any]]:
        from offline_opd.backends.base import Sampling, batch_seed
        from offline_opd.backends.generation import HFGenerator
        from offline_opd.contract.tables import rollout_table, scored_table
        from offline_opd.train.shard_data import collate

        order = self._order()
        total = self.cfg.max_steps * self.accumulate()
        ids, tokens = self.prompts
        for b in range(total):
            pick = [next(order) for _ in range(self.per_batch)]
            if b < self.start_batches:
                continue
            model = self.module.model if self.frozen_sampler is None else self.frozen_sampler
            with self.phases.timed("generate"):
                was_training = model.training
                model.eval()
                generator = HFGenerator(model, self.tokenizer, self.rollouts.batch_size)   # the weights of now
                samples = generator.generate([tokens[i] for i in pick], Sampling(
                    self.rollouts.n_samples, self.rollouts.temperature, self.rollouts.max_new_tokens,
                    batch_seed(self.rollouts.seed + self.cfg.seed, b)))
                model.train(was_training)
                table = rollout_table([ids[i] for i in pick], [tokens[i] for i in pick], samples)
            input_ids, prompt_lens = table.column("input_ids").to_pylist(), table.column("prompt_len").to_pylist()
            with self.phases.timed("score"):
                scored = self.scorer.score(input_ids, prompt_lens, k=self.k)
            lengths = list(map(len, input_ids))
            self.tokens["sequences"] += len(lengths)
            self.tokens["scored_tokens"] += sum(lengths)
            self.tokens["generated_tokens"] += sum(lengths) - sum(prompt_lens)
            yield collate(scored_table(table, scored, self.fmt), self.fmt)


def check_online(topk: TeacherTopkConfig, where: str) -> None:
    """Online OPD scores plain top-k only: the other teacher_topk selections are refused by name."""
    if topk.selection != "topk" or topk.privileged_context is not None or topk.union_student_k:
        raise UserError(f"{where}: teacher_topk.selection must be 'topk' with no privileged_context and "
                        f"union_student_k 0 for online OPD (got {topk.selection!r}); set them, or use offline distill")


def run(args: argparse.Namespace, cfg: DistillConfig) -> dict:
    from offline_opd.backends.engine import load_engine
    from offline_opd.train.losses import check_kernel_backend, loss_from_config
    from offline_opd.models.loading import load_config, load_tokenizer
    from offline_opd.contract.prompts import encode_prompt, read_prompts
    from offline_opd.contract.tables import teacher_format
    from offline_opd.train.module import TrainModule
    from offline_opd.train.trainer import fit, load_for_training, save_model

    start, start_cpu, phases = time.perf_counter(), time.process_time(), Phases()
    check_kernel_backend(cfg, args.params)
    if cfg.strategy == "fsdp":
        raise UserError(f"{args.params}: distill.strategy: fsdp is not supported by online OPD (it samples from "
                        f"the live model, whose weights FSDP shards); set it to auto or ddp")
    if cfg.gkd.off_policy:
        raise UserError(f"{args.params}: distill.gkd mixes in the teacher's scored SFT answers, which online OPD "
                        f"(every sequence sampled by the live student) does not read; set lambda_start and "
                        f"lambda_end to 1 for an online run")
    sections = load_params(args.params, required=("rollouts", "teacher_topk"))   # one parse for both
    rollouts: RolloutsConfig = sections["rollouts"]
    topk: TeacherTopkConfig = sections["teacher_topk"]
    check_online(topk, str(args.params))
    with phases.timed("load"):
        fmt = teacher_format(topk, load_config(args.teacher).vocab_size)
        objective = loss_from_config(cfg, f"{args.params}: distill", behavior_temperature=rollouts.temperature)
        table = read_prompts(args.prompts)
        tokenizer = load_tokenizer(args.init)
        prompts = (table.column("prompt_id").to_pylist(),
                   [encode_prompt(tokenizer, t) for t in table.column("prompt").to_pylist()])
        model, dtype, _ = load_for_training(args.init, cfg.precision)
        module = TrainModule(model, cfg, objective)
        scorer = load_engine(args.teacher, topk, "teacher_topk", max_logprobs=topk.k)   # hf or vllm, as configured
        frozen = copy.deepcopy(model).eval() if args.sampler == "init" else None
    data = OnlineBatches(module, prompts, tokenizer, scorer, fmt, cfg, rollouts, topk.k, phases, frozen)
    try:
        result = fit(module, data, cfg, args.logs, f"online-{time.time_ns()}", f"{args.params}: distill",
                     callbacks=[phase_timer(phases)])
    finally:
        scorer.close()
    save_model(result, args.out, dtype, lambda folder: tokenizer.save_pretrained(folder))
    return {"sampler": args.sampler, "final_loss": result.final_loss, "steps": result.trainer.global_step,
            "online_wall_s": round(time.perf_counter() - start, 4),
            "online_cpu_s": round(time.process_time() - start_cpu, 4),
            "phases": phases.metrics(), **data.tokens, **result.speed(), "config": dataclasses.asdict(cfg)}


def main(argv: list[str] | None = None) -> dict:
    return stage_main("online_distill", __doc__, add_args, run, argv, section="distill")


if __name__ == "__main__":
    cli(main)
