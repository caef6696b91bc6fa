"""Where a stage's units of work run: one after another in this process, or spread over a Ray Data actor pool.

A stage that runs an engine cuts its work into units it can number: the parts of `sft_data`, `rollouts` and
`teacher_topk` (each written as its own shard), or the batches of `evaluate`'s greedy decoding. It hands
`run_units` a picklable `Work` that knows how to load its engine(s), do unit i and close them, and gets back
one JSON-able record per unit (a part's counts, a batch's response ids) as the units finish, in any order.

`<section>.cluster.backend: local` (the default) loads the engine here and does the units in order, exactly
what the stages did before this module existed; Ray is never imported. `ray` streams the unit numbers as a
Ray Data dataset through `map_batches` to a pool of `replicas` actors, each holding one engine for its
whole life (`cpus_per_replica`, `gpus_per_replica`; vLLM splits the model over an actor's GPUs by tensor
parallelism), one unit per call and one call in flight per actor, so a slow unit never holds others
queued behind it. Why the unit is a whole part:

* Resume stays what it was: a part is written atomically by whoever computes it, so a killed actor or a
  killed driver leaves finished parts and nothing that looks finished; the rerun skips the finished ones.
* Ray Data restarts an actor that dies and retries the unit it held (`RETRIES` times); the retry rewrites
  the same part with the same rows (every sequence is seeded from its part and its index in it), so a part
  is neither lost nor written twice.
* Results do not depend on the cluster: a unit is computed by the same engine call, on the same batch, as
  in the local loop, so the rows are identical to a single-process run.

Parts travel as numbers and are written by the actors, so a multi-node cluster needs the model paths and
the stage's folders on a filesystem every node sees (what multi-node training needs too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol, Sequence

from tqdm import tqdm

from offline_opd.backends.engine import greedy_responses, load_engine
from offline_opd.backends.generation import length_batches
from offline_opd.config import ClusterConfig, StageEngineConfig
from offline_opd.errors import UserError, require

log = logging.getLogger("opd")

# Restarts of one actor, and retries of one unit after its actor died, before the stage fails. Ray Data's
# default is unlimited: a part that kills its actor every time (out of memory, say) would loop forever.
RETRIES = 3
INSTALL_HINT = "pip install -e '.[ray]' (make install EXTRAS=dev,ray)"
THREAD_VARS = ("OPD_NUM_THREADS", "OMP_NUM_THREADS")


class Work(Protocol):
    """What a stage hands to `run_units`; pickled to every actor, so it holds paths and settings, not models."""

    def open(self) -> ContextManager[Callable[[int], dict]]:
        """Load the engine(s) in the process that will do the work, give the function doing unit i, and close
        them on exit: a vLLM engine left open outlives the stage's process (and holds its GPU and pipes)."""
        ...


def run_units(work: Work, units: Sequence[int], cluster: ClusterConfig, section: str,
              noun: str = "part") -> Iterator[tuple[int, dict]]:
    """(unit, record) for every unit of `units`, each exactly once, as they finish; `section` names the
    params section in messages, `noun` what a unit is (progress bars)."""
    if not units:
        return
    if cluster.backend == "local":
        with work.open() as do:
            for unit in tqdm(units, desc=section, unit=noun):
                yield unit, do(unit)
        return
    yield from _run_on_ray(work, list(units), cluster, section, noun)


@dataclass(frozen=True)
class GreedyWork:
    """Greedy responses of one model, one engine batch per unit (`evaluate`'s generation on the pool)."""

    model: Path
    cfg: StageEngineConfig
    section: str
    batches: list[list[list[int]]]     # prompt ids of each unit
    max_new_tokens: int

    @contextmanager
    def open(self) -> Iterator[Callable[[int], dict]]:
        engine = load_engine(self.model, self.cfg, self.section, tensor_parallel=self.cfg.cluster.tensor_parallel)
        try:
            yield lambda i: {"responses": greedy_responses(engine, self.batches[i], self.max_new_tokens)}
        finally:
            engine.close()


def pooled_greedy_responses(model: Path, cfg: StageEngineConfig, section: str, prompt_ids: list[list[int]],
                            max_new_tokens: int) -> list[list[int]]:
    """`greedy_responses` of `model` over `cfg.cluster`. The units are the batches the hf engine itself would
    make (length-sorted, `batch_size` prompts), so every prompt is decoded in the same padded batch as in
    one process and the responses are identical to a local run."""
    batches = length_batches([len(p) for p in prompt_ids], cfg.batch_size)
    work = GreedyWork(model, cfg, section, [[prompt_ids[i] for i in idx] for idx in batches], max_new_tokens)
    out: list[list[int]] = [[] for _ in prompt_ids]
    for b, record in run_units(work, range(len(batches)), cfg.cluster, section, noun="batch"):
        for i, response in zip(batches[b], record["responses"]):
            out[i] = response
    return out


def _import_ray(section: str):
    """Ray with its Data library (the `ray` extra), or the one-line error naming the key and the extra."""
    install = f"{INSTALL_HINT}, or set {section}.cluster.backend: local"
    purpose = f"params.yaml: {section}.cluster.backend: ray"
    # The top package first: an already imported `ray.data` is found in sys.modules without importing `ray`.
    ray = require("ray", install, purpose)
    require("ray.data", install, purpose)
    return ray


class _Actor:
    """One replica: builds the engine once, then does one unit per call, and closes it when Ray Data lets the
    actor go (a killed actor's engine processes go with it: Ray reaps a worker's children). A user error (a
    sequence too long, say) travels back as a record, so the driver can raise it as the one-line error it
    is: Ray would otherwise wrap it in a traceback, and restart an actor whose constructor raised, to fail
    the same way."""

    def __init__(self, work: Work) -> None:
        from offline_opd.runtime import apply_thread_policy

        apply_thread_policy()
        self.error, self.do = None, None
        try:
            self.opened = work.open()
            self.do = self.opened.__enter__()
        except UserError as exc:
            self.error = str(exc)

    def __del__(self) -> None:
        if self.do is not None:
            self.opened.__exit__(None, None, None)

    def __call__(self, batch: dict) -> dict:
        units = [int(u) for u in batch["unit"]]
        records = []
        for unit in units:
            try:
                record = {"error": self.error} if self.error else {"ok": self.do(unit)}
            except UserError as exc:
                record = {"error": str(exc)}
            records.append(json.dumps(record))
        return {"unit": units, "record": records}


@contextmanager
def session(cluster: ClusterConfig, section: str) -> Iterator[None]:
    """One Ray connection for the `run_units` calls inside (evaluate runs three models in a row), so a local
    cluster starts once. Nothing for `local`; a Ray this process had already started is used and left up."""
    if cluster.backend != "ray":
        yield
        return
    ray = _import_ray(section)
    started = _start(ray, cluster, section)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _start(ray, cluster: ClusterConfig, section: str) -> bool:
    """Connect to `cluster.address`, or start a local cluster sized for the pool; False if Ray was already up."""
    if ray.is_initialized():
        return False
    # Actors see the driver's thread policy on any cluster (a local one inherits the environment anyway).
    env = {k: os.environ[k] for k in THREAD_VARS if k in os.environ}
    common = dict(include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": env})
    if cluster.address:
        ray.init(address=cluster.address, **common)
        return True
    replicas = cluster.replicas
    cpus = max(os.cpu_count() or 1, math.ceil(replicas * cluster.cpus_per_replica))
    ray.init(num_cpus=cpus, **common)
    gpus = ray.cluster_resources().get("GPU", 0)
    if replicas * cluster.gpus_per_replica > gpus:
        ray.shutdown()
        raise UserError(f"params.yaml: {section}.cluster: {replicas} replicas x {cluster.gpus_per_replica:g} GPUs "
                        f"need {replicas * cluster.gpus_per_replica:g} GPUs, this machine has {gpus:g}; lower "
                        f"{section}.cluster.replicas or gpus_per_replica, or set address to a Ray cluster that has them")
    return True


def _run_on_ray(work: Work, units: list[int], cluster: ClusterConfig, section: str,
                noun: str) -> Iterator[tuple[int, dict]]:
    ray = _import_ray(section)
    replicas = min(cluster.replicas, len(units))   # an actor with no unit to do would only load a model
    with session(cluster, section):
        yield from _pool(ray, work, units, cluster, section, noun, replicas)


def _pool(ray, work: Work, units: list[int], cluster: ClusterConfig, section: str, noun: str,
          replicas: int) -> Iterator[tuple[int, dict]]:
    ray.data.DataContext.get_current().enable_progress_bars = False   # the tqdm below counts units, not blocks
    pending = set(units)
    try:
        dataset = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing actor options this way, but names no other way to bound restarts.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            results = dataset.map_batches(
                _Actor, fn_constructor_args=(work,), batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
                num_cpus=cluster.cpus_per_replica, num_gpus=cluster.gpus_per_replica,
                max_restarts=RETRIES, max_task_retries=RETRIES)
        log.info("%s: %d %ss on %d Ray actors (%g CPU, %g GPU each)", section, len(units), noun, replicas,
                 cluster.cpus_per_replica, cluster.gpus_per_replica)
        for row in tqdm(results.iter_rows(), total=len(units), desc=section, unit=noun):
            unit, record = int(row["unit"]), json.loads(row["record"])
            if "error" in record:
                raise UserError(record["error"])
            if unit not in pending:
                raise RuntimeError(f"{section}: Ray returned {noun} {unit} twice")
            pending.discard(unit)
            yield unit, record["ok"]
    except ray.exceptions.ActorDiedError as exc:
        raise UserError(f"{section}: a Ray actor died on one {noun} and on its {RETRIES} retries (out of memory, or a crash "
                        f"in the engine: {str(exc).splitlines()[0]}); finished parts are kept: see the Ray logs "
                        f"(/tmp/ray/session_latest/logs on a local cluster), lower {section}.batch_size or give "
                        f"each replica more memory, and rerun") from None
    if pending:
        raise RuntimeError(f"{section}: Ray finished without {noun}s {sorted(pending)[:5]}")

