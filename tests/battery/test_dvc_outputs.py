"""Through DVC itself: a stage that fails (a params typo) keeps its previous outputs, and DVC still shows,
restores and compares them.

dvc.yaml declares every output `persist: true`, so DVC does not delete an output before it runs the stage
(it does for other outputs: a failing stage would then lose them, and metrics and plots, `cache: false`
and kept in git, could not be checked out again from DVC's cache). Slow: a whole `dvc repro` in a fresh
git+DVC project, each stage a process of its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.battery.project import snapshot, tiny_params
from offline_opd.tools.scratch_project import init_project, ran_stages, sh

KEPT = ("data/models/student_opd/", "metrics/distill.json", "plots/distill/")


@pytest.mark.slow
def test_a_failed_repro_keeps_the_outputs_and_dvc_still_reads_them(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    env = init_project(root, "ci")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    sh(["dvc", "repro"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "first run"], root, env)

    def kept() -> dict[str, str]:
        return {k: v for k, v in snapshot(root).items() if k.startswith(KEPT)}

    before = kept()
    assert any(k.startswith("data/models/student_opd/") for k in before) and "metrics/distill.json" in before
    good = (root / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["distill"]["lrr"] = params["distill"].pop("lr")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0
    assert "error: params.yaml: distill.lrr: unknown key" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    assert kept() == before, "a failed stage lost its previous outputs"

    (root / "params.yaml").write_text(good)
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], root, env).stdout)
    assert any("metrics/distill.json" in str(v) for v in shown.values())
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], root, env).stdout)["data"]
    assert plots["plots/distill/loss.svg"] and plots["plots/evaluate/accuracy.svg"]
    shutil.rmtree(root / "data" / "models" / "student_opd")
    sh(["dvc", "checkout", "data/models/student_opd"], root, env)    # cached outputs come back from DVC
    assert kept() == before
    assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == []
    out = sh(["dvc", "exp", "run", "-S", f"distill.lr={params['distill']['lrr'] * 2}"], root, env).stdout
    assert ran_stages(out) == ["distill", "evaluate"]
    rows = json.loads(sh(["dvc", "exp", "show", "--json"], root, env).stdout)
    assert rows and "metrics/eval.json" in json.dumps(rows)
