"""What every stage entry point shares: the --params flag, logging, timing, and clean user errors.

A stage module defines `add_args(parser)` and `run(args, cfg) -> dict` (extra metrics), then calls
`stage_main("name", __doc__, add_args, run)`. Known input errors print one line naming the file and
the fix and exit with status 2 instead of a traceback; so does a file system that refuses a path (a
full disk, a read-only or immutable path: the path is named). Ctrl-C prints one line and exits with
130, SIGTERM and SIGHUP with 143 and 129 (outputs are atomic, so nothing half-written is left).
Before `run`, the stage's outputs are guarded (`guard_outputs`): a second run of the same stage on the
same outputs is refused with one line (a lock file beside each output), and an output that could not
be replaced (read-only, immutable) is refused before any work. Anything else is a bug and keeps its
traceback. Torch gets 1 CPU thread unless OPD_NUM_THREADS says
otherwise (`torch_threads` says why). A stage with a --plots folder gets an SVG picture of
each CSV there (offline_opd.plots), which `dvc plots show` displays without network.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from offline_opd.atomic import DEFERRED_SIGNALS, check_writable, exclusive, write_json
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


def add_scoring_args(parser: argparse.ArgumentParser, rows: str, rows_help: str, writer: str) -> None:
    """The flags of a stage in which the teacher scores rows into shards (`teacher_topk`, `sft_topk`): the
    teacher, the `rows` flag naming the shards to score, the output folder, the prompts, `--shard`."""
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model folder (data/models/teacher)")
    parser.add_argument(rows, type=Path, required=True, help=rows_help)
    parser.add_argument("--out", type=Path, required=True, help="folder for the scored part-XXXXX.parquet shards")
    parser.add_argument("--prompts", type=Path, default=None,
                        help=f"prompt set with the answers for teacher_topk.privileged_context (default: the "
                             f"prompt file recorded in the {writer} footers); unused without privileged context")
    add_shard_arg(parser)


# OSErrors a user fixes on the file system, not in the code: one line naming the path, exit 2.
FILE_SYSTEM_FIXES = {
    errno.ENOSPC: "free space there and rerun",
    errno.EDQUOT: "free space there (or raise the quota) and rerun",
    errno.EACCES: "make it writable (chmod u+rw; `lsattr` shows an immutable path: chattr -i) and rerun",
    errno.EPERM: "make it writable (`lsattr` shows an immutable path: chattr -i) and rerun",
    errno.EROFS: "that file system is mounted read-only: write the outputs elsewhere or remount it read-write",
    errno.ENOTDIR: "a file stands where a folder is expected: move it away and rerun",
    errno.EISDIR: "a folder stands where a file is expected: move it away and rerun",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EIO: "the device reported an I/O error: check the disk, then rerun",
}
STOPPED = ("nothing half-written was kept (each output is its previous version or a complete new one); rerun "
           "it to go on: finished parts and checkpoints are reused")
# Arguments that name a stage's outputs (by convention of the stages' flags), guarded before `run`.
OUTPUT_ARGS = ("out", "logs", "plots", "metrics")
THREADS_ENV = "OPD_NUM_THREADS"


def torch_threads() -> int:
    """CPU threads for torch's intra-op pool: $OPD_NUM_THREADS, else $OMP_NUM_THREADS, else 1.

    Why 1 by default: the embedded toy models are so small that a matrix product is over before a
    thread pool has spread it, and torch's default (one thread per core) is what collapses under CPU
    contention: on a shared machine (other jobs, parallel DVC stages, DataLoader workers) spinning
    threads wait on each other. bench/thread_policy.py measures both settings with and without a
    concurrent CPU hog. Real models on GPU do not use these threads for compute; a large model on CPU
    should set OPD_NUM_THREADS to the cores it may use. `make run` sets it once for the whole DAG to the
    cores idle when it starts (offline_opd.tools.idle_cores).
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


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (a BaseException, so no `except Exception` swallows
    it), removing temporaries on the way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While a stage runs: Ctrl-C raises KeyboardInterrupt (as always), SIGTERM (what `kill`, schedulers and
    DVC send) and SIGHUP (a closed terminal) raise Terminated, and each is remembered (`received`).

    Remembered, because the exception a signal raises lands wherever the main thread is, and may not
    survive: inside a C extension's import it becomes a SystemError or leaves a half-imported module
    that fails later, Lightning answers Ctrl-C with `sys.exit(1)` and SIGTERM with a SystemExit meaning
    success. Whatever a run then ends with, it was stopped by the signal, and says so; a run that
    completes although a signal arrived (its exception swallowed somewhere) says so too (`check`).
    The previous handlers come back afterwards (in-process callers keep theirs), and a signal the
    caller ignores stays ignored: `nohup dvc repro` must survive its terminal closing.
    """

    SIGNALS = DEFERRED_SIGNALS   # the signals atomic.signals_deferred holds back: the two must agree

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    def check(self) -> None:
        """Raise now a signal that arrived but whose exception some library swallowed (a bare `except:` in
        an import, say): the stage must not report success to DVC after it was told to stop."""
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is not None:
            raise Terminated(self.received)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def signal_behind(exc: BaseException, received: int | None = None) -> int | None:
    """The signal that stopped a run ending in `exc`: Ctrl-C or SIGTERM/SIGHUP as `exc` itself or in its
    causes and contexts, else one received during the run (`StopSignals.received`); None if none."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(e, Terminated):
            return e.signum
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return received


def output_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The stage's output paths from its flags (OUTPUT_ARGS), by flag name."""
    found = [(name, getattr(args, name)) for name in OUTPUT_ARGS if getattr(args, name, None) is not None]
    return [(name, Path(path)) for name, path in found]


@contextmanager
def guard_outputs(name: str, args: argparse.Namespace) -> Iterator[None]:
    """Hold each output's lock for the whole run and check that every output can be replaced, before any work.

    The lock is `.<output>.lock` beside the output (with `--shard i/n`, one per shard: n processes
    may fill one folder); a second run of the stage on the same output is refused with one line
    naming the output and the process holding it. The writability check turns a read-only or
    immutable output, found after hours of work, into an error before the first minute. Only rank 0
    writes outputs, so only rank 0 guards them (the other ranks of a distributed run share its outputs).
    """
    if not is_rank_zero():
        yield
        return
    shard = getattr(args, "shard", (0, 1))
    suffix = f".shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else ""
    with ExitStack() as stack:
        for arg, path in output_paths(args):
            stack.enter_context(exclusive(path, f"{name} (--{arg.replace('_', '-')})",
                                          suffix if arg == "out" else ""))
        for _, path in output_paths(args):
            check_writable(path)
        check_writable(args.metrics_dir / f"{name}.json")
        yield


def run_stage(name: str, argv: list[str]) -> dict:
    """Run stage `name` in this process as `python -m offline_opd.stages.<name>` would (benchmarks and test
    drivers): a stage is an entry point reached by its name, never a library imported for its helpers."""
    return importlib.import_module(f"offline_opd.stages.{name}").main(argv)


def stage_main(name: str, doc: str | None, add_args: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace, Any], dict | None], argv: list[str] | None = None,
               section: str | None = None) -> dict:
    """Parse args, load the stage's params section, guard the outputs, run, and write `metrics/<name>.json`
    with its wall time. Order: everything that can refuse (params, inputs, outputs that cannot be
    written) refuses before `run` replaces anything, and `run` itself validates before writing."""
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
    stops = StopSignals()
    try:
        with stops:
            threads = apply_thread_policy()
            cfg = load_checked(section or name, args.params)
            with guard_outputs(name, args):
                metrics = {**(run(args, cfg) or {}), "torch_threads": threads}
                stops.check()
                plots = getattr(args, "plots", None)
                if plots is not None and plots.is_dir():
                    render_folder(plots, name)
                metrics = {"wall_s": round(time.perf_counter() - start, 2), **metrics}
                if is_rank_zero():
                    write_json(args.metrics_dir / f"{name}.json", metrics)
    except UserError as exc:
        fail(f"error: {exc}", 2)
    except BrokenPipeError:
        _quiet_stdout()
        fail(f"error: {name}'s standard output was closed (a pipe whose reader exited); it stopped, no partial "
             f"output was kept", 2)
    except BaseException as exc:
        stop = signal_behind(exc, stops.received)
        if stop == signal.SIGINT:
            fail(f"interrupted: {name} stopped by Ctrl-C; {STOPPED}", 130)
        if stop is not None:
            fail(f"terminated: {name} stopped by {signal.Signals(stop).name}; {STOPPED}", 128 + stop)
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            # A library ended the process "successfully" mid-run: with persistent outputs, DVC would then
            # record the previous run's outputs as this run's. It did not finish: say so, and fail.
            fail(f"error: {name} was ended by a library (exit status 0) before it finished writing its outputs; "
                 f"rerun it", 1)
        if not isinstance(exc, OSError) or exc.errno not in FILE_SYSTEM_FIXES:
            raise
        where = exc.filename or next((str(path) for _, path in output_paths(args)), "the stage's outputs")
        fail(f"error: {where}: {os.strerror(exc.errno)} while {name} ran; {FILE_SYSTEM_FIXES[exc.errno]}", 2)
    if is_rank_zero():
        log.info("%s done in %.1f s", name, metrics["wall_s"])
    return metrics


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


@contextmanager
def closed_pipe_is_quiet() -> Iterator[None]:
    """For commands that print results (`opd-inspect ... | head -1`): a reader that stops early ends the
    command silently with status 141, what a shell reports for a process SIGPIPE stopped, instead of a
    BrokenPipeError traceback (Python ignores SIGPIPE, so the write raises instead)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        raise SystemExit(128 + signal.SIGPIPE) from None


def cli(main: Callable[[], Any]) -> None:
    """Run a stage's `main` as a command. After it succeeds in a process that loaded vLLM, exit without
    interpreter teardown: the stage's outputs and metrics are already written atomically, but vLLM's
    leftover threads can abort the process at teardown ("terminate called without an active exception",
    exit -6), and DVC would then mark a finished stage as failed. The hard exit skips the finalizers that
    stop vLLM's engine-core process, so `end_children` stops it first. In-process callers (tests, bench/)
    call `main` directly and keep the normal exit.

    Whatever `main` ends with, a string `exec` runs first, because of a CPython quirk (seen here on 3.11;
    3.12's source does the same): a Ctrl-C that lands inside a string `exec` (dataclasses, namedtuple and
    others build code that way, at import time too) sets a flag that the caller's catching it does not clear,
    and a `python -m` process with that flag set dies by SIGINT at exit (status -2) whatever its SystemExit
    said: the stage's 130, or 0. Each string `exec` starts by clearing the flag; the stage has already said
    how it ended."""
    try:
        main()
    finally:
        exec("None")
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
