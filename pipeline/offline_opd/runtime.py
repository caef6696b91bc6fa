"""What every stage entry point shares: the --params flag, logging, timing, and clean user errors.

A stage module defines `add_args(parser)` and `run(args, cfg) -> dict` (extra metrics), then calls
`stage_main("name", __doc__, add_args, run)`. Known input errors print one line naming the file and
the fix and exit with status 2 instead of a traceback; so does a full disk (the path it was writing).
Ctrl-C prints one line and exits with 130 (outputs are atomic, so nothing half-written is left).
Anything else is a bug and keeps its traceback. Torch gets 1 CPU thread unless OPD_NUM_THREADS says
otherwise (`torch_threads` says why). A stage with a --plots folder gets an SVG picture of
each CSV there (offline_opd.plots), which `dvc plots show` displays without network.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from offline_opd.atomic import write_json
from offline_opd.errors import UserError
from offline_opd.plots import render_folder
from offline_opd.validation import load_checked

log = logging.getLogger("opd")


def is_rank_zero() -> bool:
    """Whether this is the first process of a distributed run (or the only one); only it writes outputs.

    Read from the variables launchers set (torchrun: RANK; Lightning's launcher: NODE_RANK, LOCAL_RANK;
    srun: SLURM_PROCID), so it holds before any process group exists.
    """
    return all(int(os.environ.get(key, "0")) == 0 for key in ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID"))


def parse_shard_spec(spec: str) -> tuple[int, int]:
    """`--shard i/n`: this process writes the parts whose index is i modulo n (docs/design.md §8)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n such as 0/4, got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def add_shard_arg(parser: argparse.ArgumentParser) -> None:
    """`--shard I/N` for stages that write parts (docs/design.md §8); a bad value is a usage error naming the fix."""

    def spec(value: str) -> tuple[int, int]:
        try:
            return parse_shard_spec(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument("--shard", type=spec, default=(0, 1), metavar="I/N",
                        help="write only the parts whose index is I modulo N, so N processes (a SLURM array, "
                             "several nodes) can fill one folder in parallel (default 0/1: all parts)")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
THREADS_ENV = "OPD_NUM_THREADS"


def torch_threads() -> int:
    """CPU threads for torch's intra-op pool: $OPD_NUM_THREADS, else $OMP_NUM_THREADS, else 1.

    Why 1 by default: the embedded toy models are so small that a matrix product is over before a
    thread pool has spread it, and torch's default (one thread per core) is what collapses under CPU
    contention: on a shared machine (other jobs, parallel DVC stages, DataLoader workers) spinning
    threads wait on each other. bench/thread_policy.py measures both settings with and without a
    concurrent CPU hog. Real models on GPU do not use these threads for compute; a large model on CPU
    should set OPD_NUM_THREADS to the cores it may use.
    """
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        raw = os.environ.get(name)
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise UserError(f"environment {name}={raw!r}: expected a whole number of threads >= 1; "
                                f"unset it or fix the value")
            return int(raw)
    return 1


def apply_thread_policy() -> int:
    """Set the thread count before torch starts its pool (or on the pool, if torch is already loaded)."""
    n = torch_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def fail(message: str, status: int) -> None:
    """The one line a user sees for an error they can fix (newlines in wrapped messages flattened)."""
    print(' '.join(message.splitlines()), file=sys.stderr)
    raise SystemExit(status) from None


def stage_main(name: str, doc: str | None, add_args: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace, Any], dict | None], argv: list[str] | None = None,
               section: str | None = None) -> dict:
    """Parse args, load the stage's params section, run, and write `metrics/<name>.json` with its wall time."""
    parser = argparse.ArgumentParser(prog=f"python -m offline_opd.stages.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameter file (default: params.yaml, the one DVC tracks)")
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"),
                        help="where the stage writes <stage>.json with its wall time (default: metrics)")
    add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    start = time.perf_counter()
    try:
        threads = apply_thread_policy()
        cfg = load_checked(section or name, args.params)
        metrics = {**(run(args, cfg) or {}), "torch_threads": threads}
        plots = getattr(args, "plots", None)
        if plots is not None and plots.is_dir():
            render_folder(plots, name)
    except UserError as exc:
        fail(f"error: {exc}", 2)
    except KeyboardInterrupt:
        fail(f"interrupted: {name} stopped by Ctrl-C; no partial output was kept (finished parts and "
             f"checkpoints were), rerun to go on", 130)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = exc.filename or getattr(args, "out", None) or "the stage's outputs"
        fail(f"error: {where}: {os.strerror(exc.errno)} while {name} was writing; free space there and rerun", 2)
    metrics = {"wall_s": round(time.perf_counter() - start, 2), **metrics}
    if not is_rank_zero():
        return metrics
    write_json(args.metrics_dir / f"{name}.json", metrics)
    log.info("%s done in %.1f s", name, metrics["wall_s"])
    return metrics


def cli(main: Callable[[], Any]) -> None:
    """Run a stage's `main` as a command. After it succeeds in a process that loaded vLLM, exit without
    interpreter teardown: the stage's outputs and metrics are already written atomically, but vLLM's
    leftover threads can abort the process at teardown ("terminate called without an active exception",
    exit -6), and DVC would then mark a finished stage as failed. The hard exit skips the finalizers that
    stop vLLM's engine-core process, so `end_children` stops it first. In-process callers (tests, bench/)
    call `main` directly and keep the normal exit."""
    main()
    if "vllm" in sys.modules:
        end_children()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def end_children(grace_s: float = 10.0) -> None:
    """Stop every process this one started through multiprocessing (a vLLM engine core still open), so that
    a finished stage leaves no process behind, multiprocessing's resource tracker included.

    Why: an engine core outlives a hard exit, and it holds the resource tracker's pipe open, so the
    tracker (which ignores SIGTERM by design) also stays: found after `dvc exp run` with backend vllm.
    SIGTERM first (vLLM shuts its engine down on it), SIGKILL after `grace_s`. The tracker then exits by
    itself when this process exits and closes the last end of its pipe (it unlinks any shared memory left
    registered first).
    """
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(5.0)
