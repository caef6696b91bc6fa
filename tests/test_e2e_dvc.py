"""End to end: `dvc repro` of the CI preset in a fresh git+DVC project, then the incremental guarantees.

This is the test that proves the DAG wiring: every stage runs through its real CLI, a second repro
does nothing, and a `distill` parameter change reruns only `distill` and `evaluate`.
"""

import json
import re
import shutil
import statistics
import subprocess

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from offline_opd.provenance.fingerprint import model_fingerprint
from offline_opd.tools.rounds import ROUND_STAGES
from offline_opd.tools.scratch_project import STAGES, init_project, ran_stages, sh
from tests.tiny_models import REPO


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
    """The README's shell recipe, verbatim: the views over the checked parts, then the query, through the
    `duckdb` command the install provides."""
    root, env, _ = project
    k = yaml.safe_load((root / "params.yaml").read_text())["teacher_topk"]["k"]
    readme = (REPO / "README.md").read_text()
    views_cmd, duckdb_cmd = "opd-inspect queries views > views.sql", (
        'duckdb -c ".read views.sql" -c "select count(*), avg(len(topk_ids)/ (len(input_ids)-prompt_len)) '
        'from shards"')
    assert f"{views_cmd}\n{duckdb_cmd}\n" in readme
    views = sh(["python", "-m", "offline_opd.tools.inspect_shards", "queries", "views"], root, env).stdout
    (root / "views.sql").write_text(views)
    query = duckdb_cmd.split('-c "')[2].rstrip('"')
    out = sh(["duckdb", "-csv", "-noheader", "-c", ".read views.sql", "-c", query], root, env).stdout
    (root / "views.sql").unlink()
    n, avg_k = out.strip().splitlines()[-1].split(",")
    assert int(n) > 0 and float(avg_k) == k


def test_second_repro_does_nothing(project):
    root, env, _ = project
    assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == []


def test_teacher_rerun_with_identical_weights_leaves_downstream_cached(project):
    """Hashed outputs carry no timestamps: retraining the teacher to the same weights changes no byte of its
    folder, so DVC keeps every stage after it. (A `created_at` in opd_provenance.json reran all six.)"""
    root, env, _ = project
    before = (root / "data" / "models" / "teacher" / "opd_provenance.json").read_bytes()
    assert ran_stages(sh(["dvc", "repro", "-f", "-s", "teacher"], root, env).stdout) == ["teacher"]
    assert (root / "data" / "models" / "teacher" / "opd_provenance.json").read_bytes() == before
    assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == []


def test_distill_param_change_reruns_only_distill_and_evaluate(project):
    root, env, _ = project
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "first run"], root, env)
    lr = yaml.safe_load((root / "params.yaml").read_text())["distill"]["lr"]
    out = sh(["dvc", "exp", "run", "-S", f"distill.lr={lr * 2}"], root, env).stdout
    assert ran_stages(out) == ["distill", "evaluate"]


def test_rounds_run_through_dvc_and_rerun_only_what_a_change_reaches(project):
    """`offline_opd.tools.rounds --rounds 2` adds round 2 to the DAG: `dvc repro -P` runs only it, then nothing; a
    distill change reruns both rounds' distill and what follows, never the shared stages before them."""
    root, env, _ = project
    sh(["python", "-m", "offline_opd.tools.rounds", "--rounds", "2"], root, env)
    assert ran_stages(sh(["dvc", "repro", "-P"], root, env).stdout) == [f"{s}_r2" for s in ROUND_STAGES]
    r2 = json.loads((root / "metrics" / "rounds" / "r2" / "eval.json").read_text())
    assert 0.0 <= r2["student_opd"]["accuracy"] <= 1.0
    assert ran_stages(sh(["dvc", "repro", "-P"], root, env).stdout) == []
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["distill"]["max_steps"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh(["dvc", "repro", "-P"], root, env).stdout) == [
        "distill", "evaluate", "rollouts_r2", "teacher_topk_r2", "distill_r2", "evaluate_r2"]


def test_opd_table_runs_every_kind_of_row_per_seed_and_resumes_from_its_cache(project):
    """bench/opd_table.py on the CI project: its own π_ref per seed, online and frozen-sampler online, equal-step
    rounds, the second teacher with the override; mean ± std per row; a second call trains nothing."""
    root, env, _ = project
    (root / "bench").mkdir(exist_ok=True)
    shutil.copy(REPO / "bench" / "opd_table.py", root / "bench" / "opd_table.py")
    cmd = ["python", "bench/opd_table.py", "--rows", "fkl,pg_ppo,online_fkl,online_init_fkl,r2eq,long2,inconsistent",
           "--seeds", "0,1", "--work", "runs", "--out", "results/table"]
    sh(cmd, root, env)
    table = json.loads((root / "results" / "table.json").read_text())
    runs = json.loads((root / "results" / "table_runs.json").read_text())
    for svg in ("table.svg", "table_gain.svg"):
        assert "± " in (root / "results" / svg).read_text()   # bars with their std whiskers
    assert list(table["rows"]) == ["sft", "fkl", "pg_ppo", "online_fkl", "online_init_fkl", "r2eq", "long2",
                                   "inconsistent"]
    for row, stats in table["rows"].items():
        assert stats["n"] == 2
        if row != "sft":
            accs = [r["accuracy"] for r in runs[row]]
            assert [r["seed"] for r in runs[row]] == [0, 1]
            assert stats["accuracy_mean"] == pytest.approx(statistics.fmean(accs), abs=1e-4)
            assert stats["accuracy_std"] == pytest.approx(statistics.stdev(accs), abs=1e-4)
            gains = [r["accuracy"] - r["pi_ref"] for r in runs[row]]   # 95 % t-interval, 1 degree of freedom
            assert stats["gain_ci95"] == pytest.approx(12.706 * statistics.stdev(gains) / 2 ** 0.5, abs=1e-4)
    assert {"offline_minus_online_fkl", "online_over_offline_wall_fkl", "inconsistent_minus_consistent",
            "teacher2_accuracy"} <= set(table["claims"])
    work = root / "runs"
    ((sft,), (rows,), (teacher2,)) = ([*(work / kind).iterdir()] for kind in ("sft", "rows", "teacher2"))
    s0, s1 = (load_file(sft / f"s{s}" / "student_sft" / "model.safetensors") for s in (0, 1))
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)   # SFT re-run per seed: two different π_ref
    assert json.loads((rows / "online_init_fkl" / "s0" / "metrics_online" / "online_distill.json").read_text()
                      )["sampler"] == "init"
    steps = yaml.safe_load((root / "params.yaml").read_text())["distill"]["max_steps"]
    for r in (1, 2):   # two rounds of half the steps, round 2 starting from round 1's student
        assert json.loads((rows / "r2eq" / "s0" / f"metrics_r{r}" / "distill.json").read_text())["steps"] == steps // 2
    assert json.loads((rows / "long2" / "s0" / "metrics_r1" / "distill.json").read_text())["steps"] == 2 * steps
    footer = pq.read_schema(next((rows / "inconsistent" / "s0" / "topk_r1").glob("*.parquet"))).metadata
    assert footer[b"opd.teacher_fingerprint"].decode() == model_fingerprint(teacher2 / "model") \
        != model_fingerprint(root / "data" / "models" / "teacher")
    restyled = pq.read_table(teacher2 / "sft_restyled.parquet").column("reference").to_pylist()
    assert not any(re.search(r"\d\+\d\+0=", r) for r in restyled)   # the second teacher's traces are terse
    refused = subprocess.run(   # the consistency check refuses that teacher's shards without the override
        ["python", "-m", "offline_opd.stages.distill", "--init", str(sft / "s0" / "student_sft"), "--shards",
         str(rows / "inconsistent" / "s0" / "topk_r1"), "--out", "refused", "--metrics-dir", "refused_m",
         "--logs", "refused_logs", "--plots", "refused_plots"],
        cwd=root, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "teacher mismatch" in refused.stderr
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("result.json")}
    assert len(stamps) == 14
    assert "distill done" not in sh(cmd, root, env).stderr   # all cached
    assert {p: p.stat().st_mtime_ns for p in work.rglob("result.json")} == stamps
    params = yaml.safe_load((root / "params.yaml").read_text())   # a distill edit reruns rows, not π_ref
    params["distill"]["lr"] *= 2
    (root / "lr2.yaml").write_text(yaml.safe_dump(params))
    sh(["python", "bench/opd_table.py", "--rows", "fkl", "--seeds", "0", "--params", "lr2.yaml", "--work", "runs",
        "--out", "results/lr2"], root, env)
    assert [len([*(work / kind).iterdir()]) for kind in ("sft", "rows")] == [1, 2]


def test_gkd_scores_the_sft_answers_once_then_a_new_schedule_reruns_only_distill(project):
    """sft_topk leaves an empty folder by default; GKD's λ < 1 with sft_topk enabled scores the teacher's SFT
    answers (sft_topk, distill, evaluate), and another λ schedule then reruns only distill and evaluate."""
    root, env, _ = project
    assert list((root / "data" / "sft_topk").iterdir()) == []
    path = root / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params["sft_topk"]["enabled"] = True
    params["distill"]["gkd"] = {"lambda_start": 0.5, "lambda_end": 0.5, "ramp_frac": 0.0}
    try:
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == ["sft_topk", "distill", "evaluate"]
        frac = json.loads((root / "metrics" / "distill.json").read_text())["gkd_on_policy_frac"]
        assert frac == pytest.approx(0.5, abs=0.5 / params["distill"]["batch_size"])
        rows = [sum(pq.read_metadata(p).num_rows for p in (root / "data" / d).glob("*.parquet"))
                for d in ("sft", "sft_topk")]
        assert rows[0] == rows[1] > 0
        params["distill"]["gkd"] = {"lambda_start": 0.0, "lambda_end": 0.5, "ramp_frac": 0.5}
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == ["distill", "evaluate"]
    finally:
        path.write_text(original)
