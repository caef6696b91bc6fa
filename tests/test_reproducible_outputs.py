"""Hashed outputs hold no timestamps: a stage rerun on identical inputs writes identical bytes.

DVC caches an output by its md5, so a time of writing inside a shard footer or `opd_provenance.json` would
make every rerun a new output and rerun everything downstream of it. Here `teacher` (adopting a model
folder: its output is the reference and the provenance), `rollouts` and `teacher_topk` run twice, a second
apart (a timestamp of second resolution would differ), into the same paths, and every file is compared.
"""

import hashlib
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
import torch
import yaml

from offline_opd.runtime import run_stage
from tests.tiny_models import LOCAL_CLUSTER, save_model, write_toy_prompts

ENGINE = {"backend": "hf", "dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1.0, "cluster": LOCAL_CLUSTER}
PARAMS = {
    "teacher": {"source": None},    # set to the model folder below: a pretrained teacher needs only its source
    "rollouts": {**ENGINE, "batch_size": 4, "max_new_tokens": 8, "temperature": 1.0, "rows_per_shard": 4, "seed": 0,
                 "n_samples": 2, "max_perplexity": None, "resample_budget": 0},
    "teacher_topk": {**ENGINE, "batch_size": 4, "k": 3, "logprob_dtype": "float16", "privileged_context": None,
                     "selection": "topk+sampled", "samples": 2, "union_student_k": 1, "seed": 0, "codec": "q8"},
}


def md5s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_all(root: Path, out: Path) -> None:
    common = ["--params", str(root / "params.yaml"), "--metrics-dir", str(root / "metrics")]
    run_stage("teacher", common + ["--prompts", str(root / "prompts.parquet"), "--out", str(out / "teacher"),
                                   "--plots", str(out / "plots"), "--logs", str(out / "logs")])
    run_stage("rollouts", common + ["--policy", str(root / "policy"), "--prompts", str(root / "prompts.parquet"),
                                    "--out", str(out / "rollouts")])
    run_stage("teacher_topk", common + ["--teacher", str(out / "teacher"), "--rollouts", str(out / "rollouts"),
                                        "--out", str(out / "teacher_topk")])


def test_a_rerun_on_identical_inputs_writes_identical_bytes(tmp_path):
    torch.set_num_threads(1)
    save_model(tmp_path / "policy", seed=0, hidden=16)
    save_model(tmp_path / "model", seed=1, hidden=24)
    write_toy_prompts(tmp_path / "prompts.parquet", 5)
    params = {**PARAMS, "teacher": {"source": str(tmp_path / "model")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    run_all(tmp_path, out)
    first = md5s(out)
    assert {"teacher/opd_provenance.json", "rollouts/part-00000.parquet", "teacher_topk/part-00002.parquet"} <= set(first)
    shutil.rmtree(out)
    time.sleep(1.1)
    run_all(tmp_path, out)
    assert md5s(out) == first


@pytest.mark.slow
def test_dvc_forced_rerun_records_the_same_hashes(tmp_path):
    """The same through DVC: a tiny git+DVC project with this repo's `teacher` (adopting a model folder),
    `rollouts` and `teacher_topk` commands; `dvc repro -f` a second later must leave every output hash in
    dvc.lock unchanged (so nothing downstream of them would rerun)."""
    import os
    import subprocess
    import sys

    from tests.tiny_models import REPO

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    save_model(root / "data" / "policy", seed=0, hidden=16)
    save_model(root / "model", seed=1, hidden=24)
    write_toy_prompts(root / "data" / "prompts.parquet", 5)
    (root / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "teacher": {"source": str(root / "model")}}))
    stage = f"{sys.executable} -m offline_opd.stages."
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "teacher": {"cmd": stage + "teacher --prompts data/prompts.parquet --out data/teacher --plots plots "
                                   "--logs logs", "deps": ["data/prompts.parquet"], "params": ["teacher"],
                    "outs": ["data/teacher", "logs", "plots/loss.csv"]},
        "rollouts": {"cmd": stage + "rollouts --policy data/policy --prompts data/prompts.parquet --out data/rollouts",
                     "deps": ["data/policy", "data/prompts.parquet"], "params": ["rollouts"], "outs": ["data/rollouts"]},
        "teacher_topk": {"cmd": stage + "teacher_topk --teacher data/teacher --rollouts data/rollouts --out "
                                        "data/teacher_topk", "deps": ["data/teacher", "data/rollouts"],
                         "params": ["teacher_topk"], "outs": ["data/teacher_topk"]},
    }}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("pipeline", "kernels")),
           "OPD_NUM_THREADS": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["dvc", "repro", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=600)

    def outs() -> dict:
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        return {name: [(o["path"], o["md5"]) for o in s["outs"]] for name, s in lock.items()}

    first = outs()
    assert set(first) == {"teacher", "rollouts", "teacher_topk"}
    time.sleep(1.1)
    subprocess.run(["dvc", "repro", "-f", "-q"], cwd=root, env=env, check=True, capture_output=True, timeout=600)
    assert outs() == first
