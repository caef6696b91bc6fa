"""FSDP2 (`strategy: fsdp`, pipeline/offline_opd/train/sharding.py) on CPU over gloo.

The training runs go through tests/fsdp_run.py: a pretrained tiny Llama (tied embeddings) loaded on
the meta device and read shard by shard, trained with the shared module and trainer, exported with
`save_model`. Two FSDP2 ranks x 8 rows must give the loss curve and the weights of one plain process
x 16 rows; a per-rank mean must not. A bf16-mixed run (with CPU offload and activation checkpointing)
must export a folder transformers loads and generates from. The kill -9 resume of an FSDP2 run is in
tests/test_train.py, next to the DDP one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offline_opd.models.loading import prune_layers
from offline_opd.train.trainer import load_for_training
from tests import fsdp_run
from tests.tiny_models import REPO, save_model

# FSDP2 on 2 ranks vs one process: the same rows per step, but each rank sums the gradient of its half
# batch (padded to its own width: other matmul shapes) and the halves are reduce-scattered over gloo
# instead of summed in one pass. In fp32 that is ~1e-7 relative per step; Adam divides each update by
# its running RMS, so after 8 steps (gradient clipping active in each) the weights differ by ~2e-6
# (measured). 2e-5 leaves room for that and is far below what a wrong normalisation gives (a per-rank
# mean moves weights by ~4e-2 here).
RTOL, ATOL = 2e-5, 2e-5
STEPS = 8


def env() -> dict:
    path = os.pathsep.join(str(REPO / p) for p in ("pipeline", "kernels", ""))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run(out: Path, model: Path, *flags: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """tests/fsdp_run.py in its own process group of ranks; its loss curve and exported weights."""
    cmd = [sys.executable, str(REPO / "tests" / "fsdp_run.py"), "--model", str(model), "--out", str(out),
           "--steps", str(STEPS), *flags]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results(out)


def results(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    return json.loads((out / "losses.json").read_text()), load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("fsdp") / "base", seed=0, hidden=32, layers=2)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One plain process (strategy auto), 16 rows per step, the fused lm_head path; run in this process."""
    out, threads = tmp_path_factory.mktemp("reference"), torch.get_num_threads()
    try:
        fsdp_run.main(["--model", str(model), "--out", str(out), "--strategy", "auto", "--batch", "16",
                       "--steps", str(STEPS), "--fused"])          # one thread, as the ranks run
    finally:
        torch.set_num_threads(threads)
    return results(out)


def test_sharded_loading_keeps_parameters_on_meta_and_maps_each_to_its_checkpoint_tensor(tmp_path):
    """The weights themselves are read after fully_shard (materialize); the 2-rank test below checks them."""
    from transformers import AutoModelForCausalLM

    folder = save_model(tmp_path / "m", hidden=32, layers=3)
    full = AutoModelForCausalLM.from_pretrained(folder)
    model, _, weights = load_for_training(folder, "32-true", sharded=True)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight             # still tied
    for (name, b), (_, want) in zip(model.named_buffers(), full.named_buffers()):
        assert not b.is_meta and torch.equal(b, want), name                   # rotary tables built, not read
    prune_layers(model, 2, "test")                                             # keeps layers 0 and 2
    sources = weights.sources(model)
    assert sources["model.layers.1.mlp.up_proj.weight"] == "model.layers.2.mlp.up_proj.weight"
    assert sources["model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert len(sources) == len(list(model.parameters()))


def test_two_fsdp_ranks_match_one_process_with_the_global_batch(tmp_path, model, reference):
    ref_losses, ref_w = reference
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0] - 0.5
    losses, got = run(tmp_path, model, "--strategy", "fsdp", "--devices", "2", "--batch", "8", "--fused")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    assert got.keys() == ref_w.keys()
    for key in ref_w:
        torch.testing.assert_close(got[key], ref_w[key], rtol=RTOL, atol=ATOL, msg=key)
    # Each rank held half of every tensor (dim-0 shards), never the whole model.
    for rank in (0, 1):
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert held["placements"] == ["(Shard(dim=0),)"]
        assert held["param_elements"] <= held["full_param_elements"] / 2 + 64
        assert held["optimizer_bytes"] == 2 * held["param_bytes"]              # AdamW's moments, sharded too


def test_a_per_rank_mean_fails_that_comparison(tmp_path, model, reference):
    """The comparison above can fail: each rank dividing by its own token count is another objective."""
    _, ref_w = reference
    _, got = run(tmp_path, model, "--strategy", "fsdp", "--devices", "2", "--batch", "8", "--fused",
                 "--per-rank-mean")
    worst = max(float((got[k] - ref_w[k]).abs().max()) for k in ref_w)
    assert worst > 100 * ATOL, worst


def test_bf16_mixed_fsdp_with_offload_exports_a_bf16_folder_that_transformers_loads_and_generates(tmp_path, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16_base"
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(model).save_pretrained(base)
    losses, got = run(tmp_path / "run", base, "--strategy", "fsdp", "--devices", "2", "--batch", "8",
                      "--precision", "bf16-mixed", "--offload", "--checkpointing")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5
    held = json.loads((tmp_path / "run" / "rank0.json").read_text())
    assert held["param_dtypes"] == ["torch.float32"]                         # fp32 master shards
    assert {t.dtype for t in got.values()} == {torch.bfloat16}               # saved in the base's dtype
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert exported.config.dtype == torch.bfloat16
    assert exported.config.architectures == ["LlamaForCausalLM"]             # not FSDP's class (vLLM reads it)
    prompt = torch.tensor([[4, 6, 8, 10]])
    out = exported.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    trained = load_file(base / "model.safetensors")
    assert any(not torch.equal(got[k], trained[k]) for k in got)              # the export holds trained weights
