"""The shared training stack (pipeline/offline_opd/train/): DDP over gloo equals one process with the same global
batch, accumulation equals a bigger batch, every row is read once per epoch on any split, a run killed
with SIGKILL resumes to the same weights (one process, and FSDP2 on 2 ranks from its sharded checkpoint),
gradient checkpointing leaves gradients unchanged. tests/test_fsdp.py has the rest of FSDP2.

The multi-process runs go through the `teacher` stage's CLI (Lightning's DDP launcher starts the
second rank by re-running the command), on a tiny toy teacher, so they also check that only rank 0
writes the model, the loss curve and the metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from offline_opd.stages import prepare
from offline_opd.stages import teacher as teacher_stage
from offline_opd.config import load_section
from offline_opd.train.examples import Example, ExampleStream, collate
from offline_opd.train.module import TrainModule
from offline_opd.train.supervised import cross_entropy_objective
from offline_opd.train.trainer import load_for_training
from tests.tiny_models import REPO, save_model

TASK = {"kind": "addition", "digits": 3, "n_sft": 110, "n_opd": 8, "n_eval": 8, "seed": 0, "prompt_file": None,
        "gap": None, "gap_prompts": None, "style": "columns"}
# 8 steps of 16 rows: a few hundred tokens per step, so per-micro-batch means and the global mean differ.
TEACHER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_steps": 8,
           "batch_size": 16, "lr": 3.0e-3, "warmup_frac": 0.25, "checkpoint_every_n_steps": 1}
# DDP vs one process: the same rows per step, but the gradient is summed in another order (two
# half-batch sums all-reduced over gloo instead of one sum) and the two halves pad to other widths
# (other matmul shapes, other blocked reductions). In fp32 that is ~1e-7 relative per step; Adam
# normalises each update, so over 8 steps the weights drift by ~1e-6. 2e-5 leaves room for that and
# is far below what a wrong normalisation gives (per-rank means move weights by ~1e-3 here).
RTOL, ATOL = 2e-5, 2e-5


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"task": TASK}))
    prepare.main(["--params", str(params), "--metrics-dir", str(root / "metrics"), "--out", str(root / "prompts")])
    return root / "prompts" / "sft.parquet"


def teacher_cmd(root: Path, prompts: Path, **teacher) -> list[str]:
    """The teacher stage's command line with `teacher` keys over the repo's params."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["teacher"] = {**params["teacher"], **TEACHER, **teacher}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return [sys.executable, "-m", "offline_opd.stages.teacher", "--params", str(root / "params.yaml"),
            "--metrics-dir", str(root / "metrics"), "--prompts", str(prompts), "--out", str(root / "out"),
            "--plots", str(root / "plots"), "--logs", str(root / "logs")]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)      # as the subprocesses (OMP_NUM_THREADS=1): the same reduction order


def env() -> dict:
    path = os.pathsep.join(str(REPO / p) for p in ("pipeline", "kernels", ""))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_teacher(root: Path, prompts: Path, **teacher) -> None:
    """In this process (cheaper), unless it needs its own: DDP re-launches the command for rank 1."""
    cmd = teacher_cmd(root, prompts, **teacher)
    if teacher.get("devices", 1) == 1:
        teacher_stage.main(cmd[3:])
        return
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(root: Path) -> list[float]:
    with open(root / "plots" / "loss.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "out" / "model.safetensors")


def test_ddp_and_accumulation_match_one_process_with_the_global_batch(tmp_path, prompts):
    run_teacher(tmp_path / "one", prompts, batch_size=16)
    run_teacher(tmp_path / "ddp", prompts, batch_size=8, devices=2, strategy="ddp")
    run_teacher(tmp_path / "accum", prompts, batch_size=4, accumulate_grad_batches=4)
    ref, ref_w = losses(tmp_path / "one"), weights(tmp_path / "one")
    assert len(ref) == TEACHER["max_steps"] and ref[-1] < ref[0]
    for other in ("ddp", "accum"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / other)), torch.tensor(ref), rtol=RTOL, atol=ATOL)
        got = weights(tmp_path / other)
        assert got.keys() == ref_w.keys()
        for key in ref_w:
            torch.testing.assert_close(got[key], ref_w[key], rtol=RTOL, atol=ATOL, msg=f"{other}: {key}")
    # Only rank 0 wrote: one CSV log version, and the metrics are rank 0's (they hold the accuracy).
    assert [p.name for p in (tmp_path / "ddp" / "logs" / "csv").iterdir()] == ["version_0"]
    assert "heldout_exact_match" in yaml.safe_load((tmp_path / "ddp" / "metrics" / "teacher.json").read_text())


def checkpoint_step(ckpt: Path) -> int:
    """The step of `last.ckpt`: a file (one process, DDP), or FSDP2's folder of shards plus meta.pt."""
    return torch.load(ckpt / "meta.pt" if ckpt.is_dir() else ckpt, weights_only=False)["global_step"]


# FSDP2 on 2 ranks: 12 steps (each writes a sharded checkpoint) leave seconds for a random kill to land in.
@pytest.mark.parametrize("steps,layout", [(30, {}), (12, {"strategy": "fsdp", "devices": 2, "batch_size": 8})],
                         ids=["one-process", "fsdp2-2-ranks"])
def test_kill_9_at_a_random_step_then_rerun_gives_the_uninterrupted_weights(tmp_path, prompts, steps, layout):
    run_teacher(tmp_path / "ref", prompts, max_steps=steps, **layout)
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 1.0)
    # The kill time is random; when the run outpaces it (a fast or idle machine), try again sooner.
    for attempt in range(5):
        run = tmp_path / f"run{attempt}"
        ckpt = run / "logs" / "checkpoints" / "last.ckpt"
        # Its own process group: kill -9 reaches every rank at once (rank 1 is rank 0's child).
        proc = subprocess.Popen(teacher_cmd(run, prompts, max_steps=steps, **layout), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)             # somewhere in the run: a step, a checkpoint write, anywhere
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        step = checkpoint_step(ckpt)
        if step < steps:
            break
        delay /= 4
    assert 1 <= step < steps, f"every kill landed after the run (seed {seed}); lengthen the run"
    assert not (run / "out").exists()
    run_teacher(run, prompts, max_steps=steps, **layout)
    metrics = yaml.safe_load((run / "metrics" / "teacher.json").read_text())
    assert metrics["resumed"] is True, f"seed {seed}"
    assert losses(run) == losses(tmp_path / "ref"), f"killed at step {step} (seed {seed})"
    ref, got = weights(tmp_path / "ref"), weights(run)
    for key in ref:
        assert torch.equal(got[key], ref[key]), f"{key} differs after a kill at step {step} (seed {seed})"


def examples(n: int) -> list[Example]:
    """Rows whose response lengths differ a lot (1 to 12 tokens)."""
    return [Example([4 + i % 8] + [5 + (i + j) % 9 for j in range(1 + i % 12)], 1) for i in range(n)]


@pytest.mark.parametrize("world,batch", [(1, 12), (2, 6), (3, 4)])
def test_every_row_once_per_epoch_on_any_split_and_resume_continues_exactly(world, batch):
    rows, steps = examples(36), 3                  # 3 steps of 12 rows = one epoch
    seen = []
    for rank in range(world):
        stream = iter(ExampleStream(rows, batch, seed=4, pad_id=0, rank=rank, world_size=world))
        seen.append([next(stream)["sample_id"] for _ in range(steps)])
    per_step = [sorted(i for rank in seen for i in rank[s]) for s in range(steps)]
    single = iter(ExampleStream(rows, 12, seed=4, pad_id=0))
    assert per_step == [sorted(next(single)["sample_id"]) for _ in range(steps)]   # same rows per step
    assert sorted(i for step in per_step for i in step) == list(range(36))        # each row once
    # A rank resuming after 2 micro-batches continues its stream exactly, across the epoch boundary.
    full = iter(ExampleStream(rows, batch, seed=4, pad_id=0, rank=world - 1, world_size=world))
    full_ids = [next(full)["sample_id"] for _ in range(6)]
    resumed = iter(ExampleStream(rows, batch, seed=4, pad_id=0, rank=world - 1, world_size=world, start_batches=2))
    assert [next(resumed)["sample_id"] for _ in range(4)] == full_ids[2:]


def test_collate_puts_the_point_mass_on_response_tokens_only():
    batch = collate([Example([5, 6, 7, 8], 2), Example([5, 6, 9], 1)], [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]]
    assert batch["response_mask"].tolist() == [[False, False, True, True], [False, True, True, False]]
    assert batch["topk_ids"][..., 0].tolist() == [[-1, -1, 7, 8], [-1, 6, 9, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert not batch["topk_logprobs"].any()


def sft_config(**overrides):
    return dataclasses.replace(load_section("sft", REPO / "params.yaml"), **overrides)


def test_sft_objective_is_the_cross_entropy_and_normalises_by_the_global_token_count(tmp_path):
    model = load_for_training(save_model(tmp_path / "m"), "32-true").model
    module = TrainModule(model, sft_config(), cross_entropy_objective())
    short, long = collate(examples(3)[:1], [0], 0), collate(examples(12)[10:11], [0], 0)
    for batch in (short, long):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        labels = torch.where(batch["response_mask"][:, 1:], batch["input_ids"][:, 1:], -100)
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        torch.testing.assert_close(module.compute_loss(batch).loss, want, rtol=1e-4, atol=1e-5)
    # Two micro-batches divided by their joint token count sum to the loss of the joined batch.
    n = float(short["response_mask"].sum() + long["response_mask"].sum())
    joint = collate(examples(3)[:1] + examples(12)[10:11], [0, 1], 0)
    parts = module.compute_loss(short, (n, n)).loss + module.compute_loss(long, (n, n)).loss
    torch.testing.assert_close(parts, module.compute_loss(joint).loss, rtol=1e-5, atol=1e-6)
    means = (module.compute_loss(short).loss + module.compute_loss(long).loss) / 2
    assert abs(float(means.detach() - parts.detach())) > 0.05     # the per-batch mean is a different loss


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    folder = save_model(tmp_path / "m", hidden=32, layers=3)
    batch = collate(examples(6), list(range(6)), 0)
    grads, saved = [], []
    for checkpointing in (False, True):
        model = load_for_training(folder, "32-true").model
        module = TrainModule(model, sft_config(gradient_checkpointing=checkpointing), cross_entropy_objective())
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.numel()) or t, lambda t: t):
            loss = module.compute_loss(batch).loss
        loss.backward()
        saved.append(sum(packed))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert saved[1] < 0.5 * saved[0]      # activations inside the layers were not kept for backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_weights_load_in_the_training_dtype_and_report_their_stored_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_model(tmp_path / "m")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)   # stored in bf16
    for precision, want in (("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32), ("32-true", torch.float32)):
        model, stored, _ = load_for_training(folder, precision)
        assert {p.dtype for p in model.parameters()} == {want} and stored == torch.bfloat16, precision
