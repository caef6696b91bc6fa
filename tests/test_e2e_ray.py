"""End to end on Ray: `dvc repro` of the CI preset with every engine stage's `cluster.backend: ray` (2 replicas),
in a fresh git+DVC project; then the same project switched back to `local`.

Each engine stage starts its own local Ray cluster (`address: null`) through its real CLI. Switching back
reruns the four stages whose section changed, but their run keys leave `cluster` out: every part is kept,
nothing downstream reruns, and `evaluate`, which recomputes, finds exactly the numbers the actor pool gave.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

if os.environ.get("OPD_REQUIRE_RAY") == "1" or os.environ.get("CI") == "true":
    import ray  # noqa: F401  (required here: a missing install must fail, not skip)
else:
    pytest.importorskip("ray", reason="Ray is not installed (make test installs it: make install EXTRAS=dev,ray)")

from offline_opd.contract import shards
from offline_opd.tools.scratch_project import STAGES, init_project, ran_stages, sh

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ENGINE_STAGES = ["sft_data", "rollouts", "teacher_topk", "evaluate"]
PART_STAGES = {"sft_data": "data/sft", "rollouts": "data/rollouts", "teacher_topk": "data/teacher_topk"}


def set_cluster(root, **cluster) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section in ENGINE_STAGES:
        params[section]["cluster"].update(cluster)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_ci_preset_on_ray_then_back_to_local(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    env = init_project(root, "ci")
    set_cluster(root, backend="ray", replicas=2, cpus_per_replica=1)
    assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == STAGES
    for stage, folder in PART_STAGES.items():
        shards.check_folder(root / folder)    # one complete run, every row once
        assert json.loads((root / "metrics" / f"{stage}.json").read_text())["parts_written"] >= 1
    on_ray = json.loads((root / "metrics" / "eval.json").read_text())
    for model in ["teacher", "student_sft", "student_opd"]:
        assert 0.0 <= on_ray[model]["accuracy"] <= 1.0

    set_cluster(root, backend="local")
    # sft_topk scores with the teacher_topk section, so DVC reruns it too (disabled here: it writes nothing)
    assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == ["sft_data", "rollouts", "teacher_topk", "sft_topk",
                                                                  "evaluate"]
    for stage in PART_STAGES:
        metrics = json.loads((root / "metrics" / f"{stage}.json").read_text())
        assert metrics["parts_written"] == 0 and metrics["parts_skipped"] == metrics["parts_total"], (stage, metrics)
    assert json.loads((root / "metrics" / "eval.json").read_text()) == on_ray
