"""What every stage entry point shares: the --params flag, logging, timing, and clean user errors.

A stage module defines `add_args(parser)` and `run(args, cfg) -> dict` (extra metrics), then calls
`stage_main("name", __doc__, add_args, run)`. Known input errors print one line naming the file and
the fix and exit with status 2 instead of a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.atomic import write_json
from pipeline.config import load_section
from pipeline.errors import UserError

log = logging.getLogger("opd")


def is_rank_zero() -> bool:
    """Whether this is the first process of a distributed run (or the only one); only it writes outputs.

    Read from the variables launchers set (torchrun: RANK; Lightning's launcher: NODE_RANK, LOCAL_RANK;
    srun: SLURM_PROCID), so it holds before any process group exists.
    """
    return all(int(os.environ.get(key, "0")) == 0 for key in ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID"))


def parse_shard_spec(spec: str) -> tuple[int, int]:
    """`--shard i/n`: this process writes the parts whose index is i modulo n (design §8)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n such as 0/4, got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def add_shard_arg(parser: argparse.ArgumentParser) -> None:
    """`--shard I/N` for stages that write parts (design §8); a bad value is a usage error naming the fix."""

    def spec(value: str) -> tuple[int, int]:
        try:
            return parse_shard_spec(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument("--shard", type=spec, default=(0, 1), metavar="I/N",
                        help="write only the parts whose index is I modulo N, so N processes (a SLURM array, "
                             "several nodes) can fill one folder in parallel (default 0/1: all parts)")


def stage_main(name: str, doc: str | None, add_args: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace, Any], dict | None], argv: list[str] | None = None,
               section: str | None = None) -> dict:
    """Parse args, load the stage's params section, run, and write `metrics/<name>.json` with its wall time."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{name}", description=doc,
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
        cfg = load_section(section or name, args.params)
        metrics = run(args, cfg) or {}
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics = {"wall_s": round(time.perf_counter() - start, 2), **metrics}
    if not is_rank_zero():
        return metrics
    write_json(args.metrics_dir / f"{name}.json", metrics)
    log.info("%s done in %.1f s", name, metrics["wall_s"])
    return metrics
