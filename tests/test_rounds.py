"""Multi-round offline OPD: the generated DVC stages chain each round to the previous round's student."""

from __future__ import annotations

import yaml

from offline_opd.tools import rounds
from tests.tiny_models import REPO


def generate(tmp_path, r: int) -> dict:
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    out = rounds.main(["--rounds", str(r), "--root", str(tmp_path)])
    return yaml.safe_load(out.read_text())["stages"] if out.exists() else {}


def outs(stage: dict) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots")
            for o in stage.get(key, [])}


def test_one_round_is_the_default_dag_and_removes_the_file(tmp_path):
    generate(tmp_path, 3)
    assert generate(tmp_path, 1) == {} and not (tmp_path / rounds.OUT_FILE).exists()


def test_each_round_samples_and_starts_from_the_previous_student(tmp_path):
    stages = generate(tmp_path, 4)
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {f"{s}_r{r}" for s in rounds.ROUND_STAGES for r in (2, 3, 4)}
    for r in (2, 3, 4):
        prev = rounds.student(r - 1)
        assert f"--policy {prev} " in stages[f"rollouts_r{r}"]["cmd"] and prev in stages[f"rollouts_r{r}"]["deps"]
        assert f"--init {prev} " in stages[f"distill_r{r}"]["cmd"] and prev in stages[f"distill_r{r}"]["deps"]
        assert f"--out {rounds.student(r)} " in stages[f"distill_r{r}"]["cmd"]
        assert "--ref data/models/student_sft " in stages[f"evaluate_r{r}"]["cmd"]   # gain over π_ref
        assert f"data/rounds/r{r}/teacher_topk" in stages[f"distill_r{r}"]["deps"]
        for name in rounds.ROUND_STAGES:   # same code and params as the default stage
            code = [d for d in root[name]["deps"] if d.startswith(("pipeline/", "kernels"))]
            assert [d for d in stages[f"{name}_r{r}"]["deps"] if d.startswith(("pipeline/", "kernels"))] == code
            assert stages[f"{name}_r{r}"]["params"] == root[name]["params"]
    # no two stages (root or generated) write the same path: DVC would refuse the DAG
    every = [p for s in list(root.values()) + list(stages.values()) for p in outs(s)]
    assert len(every) == len(set(every))
