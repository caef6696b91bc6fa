"""End to end: `dvc repro` of the CI preset in a fresh git+DVC project, then the incremental guarantees.

This is the test that proves the DAG wiring: every stage runs through its real CLI, a second repro
does nothing, and a `distill` parameter change reruns only `distill` and `evaluate`.
"""

import json

import pytest
import yaml

from tests.dvc_project import STAGES, init_project, ran_stages, sh


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_project")
    env = init_project(root, "ci")
    first = sh(["dvc", "repro"], root, env)
    return root, env, first.stdout


def test_repro_runs_every_stage_and_writes_metrics(project):
    root, _, out = project
    assert ran_stages(out) == STAGES
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    for model in ["teacher", "student_sft", "student_opd"]:
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
    assert (root / "plots" / "distill" / "loss.csv").read_text().startswith("step,")
    for stage in STAGES:
        assert json.loads((root / "metrics" / f"{stage}.json").read_text())["wall_s"] > 0


def test_duckdb_cli_reads_teacher_shards_and_prints_k(project):
    """The README's shell query, verbatim, through the `duckdb` command the install provides."""
    root, env, _ = project
    k = yaml.safe_load((root / "params.yaml").read_text())["teacher_topk"]["k"]
    query = ("select count(*), avg(len(topk_ids)/ (len(input_ids)-prompt_len)) "
             "from read_parquet('data/teacher_topk/*.parquet')")
    out = sh(["duckdb", "-csv", "-noheader", "-c", query], root, env).stdout
    n, avg_k = out.strip().split(",")
    assert int(n) > 0 and float(avg_k) == k


def test_second_repro_does_nothing(project):
    root, env, _ = project
    assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == []


def test_distill_param_change_reruns_only_distill_and_evaluate(project):
    root, env, _ = project
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "first run"], root, env)
    lr = yaml.safe_load((root / "params.yaml").read_text())["distill"]["lr"]
    out = sh(["dvc", "exp", "run", "-S", f"distill.lr={lr * 2}"], root, env).stdout
    assert ran_stages(out) == ["distill", "evaluate"]
