"""A few trials of bench/fault_injection.py: SIGKILL each resumable stage once at a random moment, rerun,
and require the result identical to the uninterrupted run (no row lost or duplicated).

It runs in CI (issue 11 asks for a few trials there): about 3 minutes on 2 shared cores, the reference
chain plus two runs per stage, each paying the Python/torch start-up. `bench/fault_injection.py --trials 20`
is the full measurement.
"""

from tests.tiny_models import load_bench


def test_one_kill_per_stage_resumes_to_identical_outputs(tmp_path):
    bench = load_bench("fault_injection")
    times, results = bench.run_trials(bench.STAGES, trials=1, seed=0, work=tmp_path)
    assert [r.stage for r in results] == bench.STAGES
    for r in results:
        assert r.identical and r.rows_lost == 0 and r.rows_duplicated == 0, r
    assert all(times[stage] > 0 for stage in bench.STAGES)
