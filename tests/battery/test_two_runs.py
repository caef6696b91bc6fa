"""Two runs of one stage on the same outputs at once: the second is refused in one line naming the output and
the process that holds it (a lock file beside each output, offline_opd.atomic.exclusive), and touches nothing.
`--shard i/n` processes filling one folder are not two runs: each holds its own shard's lock.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from offline_opd.atomic import exclusive
from offline_opd.contract import shards
from tests.battery.project import STAGES, command, edit_params, env, one_error_line, refuse, run, stage_argv

# The output each stage's dvc.yaml command names first (what a second run would collide on).
FIRST_OUTPUT = {stage: next(stage_argv(stage)[i + 1] for i, a in enumerate(stage_argv(stage))
                            if a in ("--out", "--metrics")) for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_a_second_run_of_a_stage_is_refused(project, capsys, stage):
    with exclusive(project / FIRST_OUTPUT[stage], "another test run"):
        line = refuse(project, stage, capsys)
    assert f"{FIRST_OUTPUT[stage]}: another run is writing it (another test run, pid" in line, line


def test_two_processes_of_one_stage(project):
    """A real second process while the first scores: refused at once; the first finishes a whole run."""
    edit_params(project, "teacher_topk", seed=11)
    lock = project / "data" / ".teacher_topk.lock"
    first = subprocess.Popen(command("teacher_topk"), cwd=project, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not lock.exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read()
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)     # holds its lock for as long as the second needs to start
    try:
        second = subprocess.run(command("teacher_topk"), cwd=project, env=env(), capture_output=True, text=True,
                                timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert f"data/teacher_topk: another run is writing it (teacher_topk (--out), pid {first.pid}" in \
        one_error_line(second.stderr)
    infos = shards.check_folder(project / "data" / "teacher_topk")
    assert {i.meta["run_key"] for i in infos} == {shards.read_meta(infos[0].path)["run_key"]} and len(infos) == 2
    assert not lock.exists()


def test_shard_processes_do_not_block_each_other(project):
    """Process 0/2 holds its lock; process 1/2 writes its own part meanwhile."""
    edit_params(project, "rollouts", seed=11)
    with exclusive(project / "data" / "rollouts", "rollouts (--out)", ".shard-0-of-2"):
        metrics = run(project, "rollouts", "--shard", "1/2")
    assert metrics["parts_written"] == 1
