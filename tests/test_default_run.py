"""The embedded default, end to end (slow: about 3 CPU-minutes; `make test-all` runs it).

It checks what the README promises for the real default: the teacher solves the task, π_ref is trained to its
plateau next to the teacher (not stopped on its learning cliff), and offline OPD on precomputed shards keeps
it there (README "The embedded default": on this task a converged π_ref leaves OPD nothing to add).
"""

import json

import pytest

from offline_opd.tools.scratch_project import STAGES, init_project, ran_stages, sh


@pytest.mark.slow
def test_default_repro_trains_pi_ref_to_the_teacher_and_distillation_keeps_it(tmp_path):
    env = init_project(tmp_path, "toy")
    assert ran_stages(sh(["dvc", "repro"], tmp_path, env).stdout) == STAGES
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert metrics["teacher"]["accuracy"] >= 0.95
    assert metrics["student_sft"]["accuracy"] >= 0.9
    assert metrics["student_opd"]["accuracy"] >= metrics["student_sft"]["accuracy"] - 0.03
