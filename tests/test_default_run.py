"""The embedded default, end to end (slow: about 6 minutes on 2 cores; `make test-all` runs it).

It checks the product's promise on the real default: the teacher solves the task, and offline OPD on
precomputed shards lifts the student clearly above π_ref.
"""

import json

import pytest

from offline_opd.tools.scratch_project import STAGES, init_project, ran_stages, sh


@pytest.mark.slow
def test_default_repro_distilled_student_beats_pi_ref(tmp_path):
    env = init_project(tmp_path, "toy")
    assert ran_stages(sh(["dvc", "repro"], tmp_path, env).stdout) == STAGES
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert metrics["teacher"]["accuracy"] >= 0.9
    assert metrics["student_opd"]["accuracy"] - metrics["student_sft"]["accuracy"] >= 0.05
    assert metrics["student_opd"]["fkl"] < metrics["student_sft"]["fkl"]
