"""Print how many CPU cores nothing else is using right now: the torch thread count `make run` gives its stages.

Every stage defaults to one torch thread (`offline_opd.runtime.torch_threads` says why: more threads than
free cores collapse under contention). On a machine that is idle, that leaves cores unused: the embedded
default's DAG took 6 min 30 s with one thread and 4 min 46 s with two on an idle 2-core VM (README, Quick
start). `make run` asks this tool once, before `dvc repro`, and exports the answer as OPD_NUM_THREADS for
every stage (unless OPD_NUM_THREADS is already set), so the demo uses the machine it finds and falls back to
one thread when anything else runs.

Why measure the CPU's idle time instead of reading the load average: the load average is a one-minute mean,
so it still counts a job that ended seconds ago (a stage the previous `make run` ran, a pip install) and
would keep an idle machine at one thread. /proc/stat's idle counters over a short window say what is free
now. Where /proc/stat does not exist (not Linux), the answer is 1, the stages' own default.

    python -m offline_opd.tools.idle_cores            # e.g. 2 on an idle 2-core machine, 1 beside one busy job
    python -m offline_opd.tools.idle_cores --window 2 # sample longer on a bursty machine
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

PROC_STAT = Path("/proc/stat")
# /proc/stat's aggregate "cpu" line: user nice system idle iowait irq softirq steal (guest time is
# already inside user and nice); idle and iowait are the ticks no task wanted the core
IDLE_FIELDS, TIME_FIELDS = (3, 4), 8


def cpu_ticks(stat: Path = PROC_STAT) -> tuple[int, int]:
    """(idle ticks, total ticks) over all cores since boot, from /proc/stat's first line."""
    fields = stat.read_text().split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"{stat}: first line is not the aggregate 'cpu' line")
    ticks = [int(v) for v in fields[1:1 + TIME_FIELDS]]
    return sum(ticks[i] for i in IDLE_FIELDS), sum(ticks)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def idle_cores(window_s: float = 0.5, cores: int | None = None,
               ticks: Callable[[], tuple[int, int]] = cpu_ticks, sleep: Callable[[float], None] = time.sleep) -> int:
    """Cores left idle over the next `window_s` seconds, rounded, at least 1 and at most `cores`.

    One busy process on an idle 2-core machine leaves half the ticks idle: 1. Rounding (not flooring) lets
    the noise of an idle machine's daemons (a few per cent) still count as idle.
    """
    cores = usable_cores() if cores is None else cores
    try:
        idle0, total0 = ticks()
        sleep(window_s)
        idle1, total1 = ticks()
    except (OSError, ValueError):
        return 1
    if total1 <= total0:
        return 1
    # /proc/stat counts every online core; the affinity mask may be narrower, so scale by the share idle
    free = cores * (idle1 - idle0) / (total1 - total0)
    return max(1, min(cores, round(free)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=0.5, metavar="SECONDS",
                        help="how long to sample the CPU's idle time (default 0.5)")
    args = parser.parse_args(argv)
    if args.window <= 0:
        parser.error(f"--window {args.window}: expected a positive number of seconds")
    print(idle_cores(args.window))


if __name__ == "__main__":
    main()
