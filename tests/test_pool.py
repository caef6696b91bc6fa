"""`<section>.cluster` without a Ray cluster: `local` never needs Ray, a missing Ray is one line, and no cluster
key is part of a run key (tests/test_ray_pool.py runs the `ray` backend itself)."""

from __future__ import annotations

import subprocess
import sys
from contextlib import nullcontext

import pytest

from offline_opd.backends.pool import run_units
from offline_opd.config import ClusterConfig
from offline_opd.errors import UserError
from tests.tiny_models import LOCAL_CLUSTER, REPO


class Units:
    def open(self):
        return nullcontext(lambda unit: {"twice": 2 * unit})


def test_local_runs_units_in_order_without_importing_ray():
    """In a fresh interpreter: every engine stage imported and the pool run locally, and `ray` never loaded."""
    code = ("import sys\n"
            "from offline_opd.stages import sft_data, rollouts, teacher_topk, evaluate\n"
            "from offline_opd.backends.pool import run_units\n"
            "from offline_opd.config import ClusterConfig\n"
            "from contextlib import nullcontext\n"
            "class Units:\n"
            "    def open(self):\n"
            "        return nullcontext(lambda unit: {'twice': 2 * unit})\n"
            f"out = list(run_units(Units(), [3, 1, 2], ClusterConfig(**{LOCAL_CLUSTER!r}), 'test'))\n"
            "assert out == [(3, {'twice': 6}), (1, {'twice': 2}), (2, {'twice': 4})], out\n"
            "assert 'ray' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_missing_ray_is_one_line_naming_the_key_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now raises ImportError, installed or not
    cluster = ClusterConfig(**{**LOCAL_CLUSTER, "backend": "ray"})
    with pytest.raises(UserError) as err:
        list(run_units(Units(), [0], cluster, "teacher_topk"))
    message = str(err.value)
    assert "\n" not in message
    assert "params.yaml: teacher_topk.cluster.backend: ray needs the Python package 'ray'" in message
    assert "EXTRAS=dev,ray" in message and "teacher_topk.cluster.backend: local" in message


def test_no_units_start_nothing(monkeypatch):
    """A resumed run with every part finished must not start a cluster (or even need Ray)."""
    monkeypatch.setitem(sys.modules, "ray", None)
    assert list(run_units(Units(), [], ClusterConfig(**{**LOCAL_CLUSTER, "backend": "ray"}), "rollouts")) == []
