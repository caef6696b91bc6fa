"""`make run` gives its stages the cores that are idle when it starts (offline_opd.tools.idle_cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline_opd.tools.idle_cores import cpu_ticks, idle_cores

ROOT = Path(__file__).resolve().parents[1]


def ticks_between(idle: tuple[int, int], total: tuple[int, int]):
    """A fake /proc/stat reader: the first call gives the window's start, the second its end."""
    samples = iter(zip(idle, total))
    return lambda: next(samples)


@pytest.mark.parametrize("cores, idle_share, expected", [
    (2, 0.97, 2),    # an idle machine: its daemons' few per cent still round to all cores
    (2, 0.50, 1),    # one busy process of two cores
    (2, 0.02, 1),    # everything busy: never fewer than one thread
    (4, 0.65, 3),    # 2.6 cores free
    (8, 1.00, 8),
])
def test_idle_cores_counts_the_free_share_of_the_window(cores, idle_share, expected):
    window_total = 1000
    ticks = ticks_between((5_000, 5_000 + round(idle_share * window_total)), (20_000, 20_000 + window_total))
    slept = []
    assert idle_cores(0.25, cores=cores, ticks=ticks, sleep=slept.append) == expected
    assert slept == [0.25]


def test_idle_cores_falls_back_to_one_thread_without_a_reading():
    def unreadable():
        raise OSError("no /proc/stat here")
    assert idle_cores(0.1, cores=4, ticks=unreadable, sleep=lambda s: None) == 1
    # a counter that did not move (no time passed) says nothing about the machine
    assert idle_cores(0.1, cores=4, ticks=ticks_between((10, 10), (50, 50)), sleep=lambda s: None) == 1


def test_cpu_ticks_reads_the_aggregate_line(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 40 800 20 0 3 2 0 0\ncpu0 50 2 20 400 10 0 1 1 0 0\n")
    assert cpu_ticks(stat) == (820, 970)
    stat.write_text("intr 1 2 3\n")
    with pytest.raises(ValueError, match="aggregate 'cpu' line"):
        cpu_ticks(stat)


def test_cli_prints_a_thread_count_this_machine_can_use():
    out = subprocess.run([sys.executable, "-m", "offline_opd.tools.idle_cores", "--window", "0.1"],
                         capture_output=True, text=True, check=True).stdout
    assert 1 <= int(out) <= (os.cpu_count() or 1)
    bad = subprocess.run([sys.executable, "-m", "offline_opd.tools.idle_cores", "--window", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--window 0.0: expected a positive number" in bad.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_exports_idle_cores_unless_the_user_set_threads():
    """`make -n` prints the recipe: the thread count is asked for once, before dvc repro, and a set OPD_NUM_THREADS wins."""
    recipe = subprocess.run(["make", "-n", "-C", str(ROOT), "run", "VENV=.venv-absent-for-dry-run"],
                            capture_output=True, text=True, check=True).stdout
    command = recipe[:recipe.index("dvc repro")]
    assert "${OPD_NUM_THREADS:-$(" in command and "offline_opd.tools.idle_cores" in command, recipe
    assert "OPD_NUM_THREADS=$threads" in command
