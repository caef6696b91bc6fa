"""A stage that fails keeps the previous run's outputs: it validates before it touches them, and replaces them
only with complete new ones.

The failures come at every point of a stage: its params (a typo), a setting that only fails on the first
batch (a context too short for the prompts), a crash or a full disk while the first new part is written,
a crash in training, a Ctrl-C in the middle of swapping a folder into place. dvc.yaml declares every output
`persist: true`, so DVC does not delete them before the stage runs either (tests/battery/test_dvc_outputs.py).
"""

from __future__ import annotations

import errno

import pytest
import yaml

from offline_opd import atomic
from offline_opd.backends.generation import HFGenerator
from offline_opd.backends.scoring import HFScorer
from offline_opd.contract import integrity
from offline_opd.train.module import TrainModule
from tests.battery.project import STAGES, edit_params, refuse, refusal, run, snapshot

SECTION = {stage: "task" if stage == "prepare" else stage for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_a_params_typo_keeps_every_output(project, capsys, stage):
    params = yaml.safe_load((project / "params.yaml").read_text())
    key = next(iter(params[SECTION[stage]]))
    params[SECTION[stage]][key + "s"] = params[SECTION[stage]].pop(key)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert f"{SECTION[stage]}.{key}" in refuse(project, stage, capsys)


@pytest.mark.parametrize("stage", ["sft_data", "rollouts", "teacher_topk", "evaluate"])
def test_a_context_too_short_for_the_prompts_keeps_every_output(project, capsys, stage):
    """New settings make every existing part stale and pass every check at load (room for 3 prompt tokens
    beside 12 response tokens); the first batch, whose prompts are longer, then fails: no old part may be gone."""
    if stage == "teacher_topk":   # it may not be shorter than the rollouts' context it scores
        edit_params(project, "rollouts", max_model_len=15)
    edit_params(project, stage, max_model_len=15)
    assert f"{stage}.max_model_len is 15 but a sequence needs" in refuse(project, stage, capsys)


def test_union_student_k_above_the_vocabulary_keeps_every_output(project, capsys):
    edit_params(project, "teacher_topk", union_student_k=200)
    assert "teacher_topk.union_student_k: 200 is more than the vocabulary" in refuse(project, "teacher_topk", capsys)


FIRST_BATCH = [("sft_data", (HFGenerator, "generate")), ("rollouts", (HFGenerator, "generate")),
               ("teacher_topk", (HFScorer, "score"))]


@pytest.mark.parametrize("stage,method", FIRST_BATCH)
def test_a_crash_on_the_first_new_part_keeps_the_old_parts(project, monkeypatch, stage, method):
    edit_params(project, stage, seed=7)   # a new run: both old parts are stale
    before = snapshot(project)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(*method, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(project, stage)
    assert snapshot(project) == before


@pytest.mark.parametrize("stage", ["sft_data", "rollouts", "teacher_topk"])
def test_a_full_disk_on_the_first_new_part_keeps_the_old_parts(project, capsys, monkeypatch, stage):
    edit_params(project, stage, seed=7)
    real = integrity.pq.write_table

    def full(table, where, **kwargs):
        real(table.slice(0, 1), where, **kwargs)     # a partial file on disk, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(integrity.pq, "write_table", full)
    line = refuse(project, stage, capsys)
    assert "No space left on device" in line and "part-00000.parquet" in line


def test_a_crash_in_training_keeps_the_distilled_model_its_metrics_and_plots(project, monkeypatch):
    """Only the resume state (logs/distill) may change: it now holds the new run's checkpoint."""
    edit_params(project, "distill", lr=5e-3)
    before = {k: v for k, v in snapshot(project).items() if not k.startswith("logs/")}

    def crash(self, batch, batch_idx):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(TrainModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(project, "distill")
    assert {k: v for k, v in snapshot(project).items() if not k.startswith("logs/")} == before


@pytest.mark.parametrize("where", ["exchange", "fallback rename"])
def test_ctrl_c_while_a_folder_is_swapped_in_keeps_the_old_one(project, capsys, monkeypatch, where):
    """prepare replaces data/prompts as a whole: Ctrl-C at the swap leaves the old folder and no temporary."""
    edit_params(project, "task", seed=3)
    before = snapshot(project)
    if where == "exchange":
        def interrupted(a, b):
            raise KeyboardInterrupt
        monkeypatch.setattr(atomic, "_exchange", interrupted)
    else:
        real, calls = atomic.os.replace, []

        def interrupted(src, dst):
            calls.append(dst)
            if len(calls) == 2:      # the new folder into place, after the old one went aside
                raise KeyboardInterrupt
            real(src, dst)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        monkeypatch.setattr(atomic.os, "replace", interrupted)
    line = refusal(capsys, lambda: run(project, "prepare"), status=130)
    assert "Ctrl-C" in line
    assert snapshot(project) == before


def test_a_library_ending_the_process_with_success_mid_run_is_a_failure(project, capsys, monkeypatch):
    """SystemExit(0) from inside training: not a finished stage (DVC would record the old, persistent outputs
    as this run's), so exit 1 with one line, and the outputs untouched."""
    edit_params(project, "distill", lr=5e-3)
    before = {k: v for k, v in snapshot(project).items() if not k.startswith("logs/")}

    def exits(self, batch, batch_idx):
        raise SystemExit(0)

    monkeypatch.setattr(TrainModule, "training_step", exits)
    line = refusal(capsys, lambda: run(project, "distill"), status=1)
    assert "before it finished writing its outputs" in line, line
    assert {k: v for k, v in snapshot(project).items() if not k.startswith("logs/")} == before
