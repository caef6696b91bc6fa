"""A few trials of bench/fault_injection.py: SIGKILL each resumable stage once at a random moment, rerun,
and require the result identical to the uninterrupted run (no row lost or duplicated).

It runs in CI (issue 11 asks for a few trials there): about 3 minutes on 2 shared cores, the reference
chain plus two runs per stage, each paying the Python/torch start-up. `bench/fault_injection.py --trials 20`
is the full measurement.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fault_injection.py"


def test_one_kill_per_stage_resumes_to_identical_outputs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fault_injection", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up while building
    spec.loader.exec_module(bench)
    times, results = bench.run_trials(bench.STAGES, trials=1, seed=0, work=tmp_path)
    assert [r.stage for r in results] == bench.STAGES
    for r in results:
        assert r.identical and r.rows_lost == 0 and r.rows_duplicated == 0, r
    assert all(times[stage] > 0 for stage in bench.STAGES)
