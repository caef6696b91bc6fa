"""Ctrl-C, SIGTERM and SIGHUP at random moments: one line, exit 128 + signal, no temporary left behind, every
output whole (the old one or a complete new one), and a rerun finishes the work to the uninterrupted result.

The moments are drawn (seeded) from the stage's own uninterrupted run time, measured first on a copy. Most
cases send the signal to this process while the stage runs in it (as fast as the in-process cases);
two send it to a real stage process, one of them `distill` inside Lightning's training loop.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline_opd.contract import shards
from offline_opd.provenance.record import check_unchanged, read_provenance
from tests.battery.project import (SHARD_FOLDERS, command, copy_tree, edit_params, env, message_lines,
                                   one_error_line, run, snapshot)

# Each stage with a params change that gives it all its work to do again.
CHANGES = {"prepare": ("task", {"seed": 3}), "sft_data": ("sft_data", {"seed": 3}),
           "rollouts": ("rollouts", {"seed": 3}), "teacher_topk": ("teacher_topk", {"seed": 3}),
           "evaluate": ("evaluate", {"n_eval": 3})}
OUTPUT = {"prepare": "data/prompts", "evaluate": "metrics/eval.json", **{k: v for k, v in SHARD_FOLDERS.items()}}
LEFTOVER = re.compile(r"(^|/)\.[^/]*\.(tmp|old)-\d+|\.lock$|opd-write-probe")
RNG = random.Random(15)
# Two moments per stage and signal: one early (start-up, reading inputs, loading), one well into the work,
# as fractions of the uninterrupted run time.
CASES = [(stage, sig, round(RNG.uniform(lo, hi), 3)) for stage in CHANGES for sig in (signal.SIGINT, signal.SIGTERM)
         for lo, hi in ((0.02, 0.3), (0.3, 0.7))] + [("sft_data", signal.SIGHUP, 0.4), ("prepare", signal.SIGHUP, 0.4)]


def content(root: Path, stage: str):
    """What an equal run must reproduce: shard rows and footers (no times), or the prompt/metrics files."""
    out = root / OUTPUT[stage]
    if stage in SHARD_FOLDERS:
        parts = shards.list_parts(out)
        return ([p.name for p in parts], pa.concat_tables(pq.read_table(p) for p in parts).to_pylist(),
                [{k: v for k, v in shards.read_meta(p).items() if k != "file_sha256"}
                 for p in parts])
    return {p.name: p.read_bytes() for p in sorted(out.rglob("*"))} if out.is_dir() else out.read_bytes()


@pytest.fixture(scope="module")
def reference(built, tmp_path_factory):
    """Per stage: its uninterrupted run time and result after the params change."""
    found = {}
    for stage, (section, change) in CHANGES.items():
        root = copy_tree(built, tmp_path_factory.mktemp(f"ref_{stage}") / "project")
        edit_params(root, section, **change)
        start = time.perf_counter()
        run(root, stage)
        found[stage] = (time.perf_counter() - start, content(root, stage))
    return found


@contextlib.contextmanager
def signal_at(sig: int, delay: float):
    """Send `sig` to this process after `delay` s, while armed; the handlers this test puts in place turn a
    late signal (after the stage returned) into nothing, instead of into an error in pytest itself."""
    armed = threading.Event()
    armed.set()

    def late_safe(signum, frame):
        if armed.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, late_safe) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    timer = threading.Timer(delay, lambda: armed.is_set() and signal.raise_signal(sig))
    timer.start()
    try:
        yield
    finally:
        armed.clear()
        timer.cancel()
        timer.join()
        for s, handler in previous.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("stage,sig,moment", CASES, ids=[f"{s}-{signal.Signals(g).name}-{m}" for s, g, m in CASES])
def test_a_signal_at_a_random_moment(project, reference, capsys, stage, sig, moment):
    seconds, expected = reference[stage]
    section, change = CHANGES[stage]
    edit_params(project, section, **change)
    old, before = snapshot(project), content(project, stage)
    capsys.readouterr()
    status = 0
    with signal_at(sig, moment * seconds):
        try:
            run(project, stage)
        except SystemExit as exc:
            status = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert status in (0, 128 + sig), err
    if status:
        (line,) = message_lines(err)
        named = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
        assert f"{stage} stopped by {named}" in line, line
    now = snapshot(project)
    assert not [name for name in now if LEFTOVER.search(name)], "a temporary or lock was left behind"
    changed = {name for name in set(old) | set(now) if old.get(name) != now.get(name)}
    out = OUTPUT[stage]
    assert all(name.startswith((out, f"metrics/{stage}.json")) for name in changed), changed
    if stage in SHARD_FOLDERS:       # every part whole: an old one, or one of the new run
        for part in shards.list_parts(project / out):
            shards.check_integrity(part)
    else:                            # a folder or file replaced as a whole: the old one or the complete new one
        assert content(project, stage) in (before, expected)
    run(project, stage)              # the rerun completes the work: equal to the uninterrupted run
    assert content(project, stage) == expected


def signal_while_stopped(proc: subprocess.Popen, sig: int) -> None:
    """Deliver `sig` at this very point of `proc`'s work, however fast the machine: stop it, queue the
    signal, let it go on (it handles the signal before its next bytecode)."""
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_a_training_process(project, sig):
    """A real `distill` process, signalled once its training begins: exit 128 + signal and one line (Lightning
    turns SIGTERM into a SystemExit meaning success, and Ctrl-C into exit 1: neither may pass for a finished
    stage, whose persistent outputs DVC would record). Each output is its previous version or a complete new
    one: a Ctrl-C that lands while Lightning starts up is now and then swallowed inside a library, the run then
    finishes, and only the exit status (130, so DVC records nothing) reports the stop."""
    edit_params(project, "distill", max_steps=400, lr=5e-3)
    before = {k: v for k, v in snapshot(project).items() if not k.startswith("logs/")}
    assert (project / "logs" / "distill" / "checkpoints" / "run_key.json").exists()
    proc = subprocess.Popen(command("distill"), cwd=project, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stamp = project / "logs" / "distill" / "checkpoints" / "run_key.json"
    old_key, deadline = stamp.read_text(), time.time() + 120
    while not stamp.exists() or stamp.read_text() == old_key:   # the new run's key: training begins
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    signal_while_stopped(proc, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"distill stopped by {'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'}" in one_error_line(err)
    after = {k: v for k, v in snapshot(project).items() if not k.startswith("logs/")}
    assert not [name for name in after if LEFTOVER.search(name)]
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {*(k for k in after if k.startswith(("data/models/student_opd/", "plots/distill/")))}, changed
    if changed:   # the new model is whole: every file its provenance records, as recorded
        check_unchanged(project / "data" / "models" / "student_opd")
        assert read_provenance(project / "data" / "models" / "student_opd")["config"]["lr"] == 5e-3


def test_ctrl_c_to_a_scoring_process(project):
    edit_params(project, "teacher_topk", seed=5)
    proc = subprocess.Popen(command("teacher_topk"), cwd=project, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lock, deadline = project / "data" / ".teacher_topk.lock", time.time() + 120
    while not lock.exists():       # taken once params and inputs are checked: the work begins
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    signal_while_stopped(proc, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "teacher_topk stopped by Ctrl-C" in one_error_line(err)
    assert not [n for n in snapshot(project) if LEFTOVER.search(n)]
    for part in shards.list_parts(project / "data" / "teacher_topk"):
        shards.check_integrity(part)


def test_an_ignored_hangup_stays_ignored(project, reference):
    """`nohup dvc repro`: the caller ignores SIGHUP, so a closed terminal must not stop the stage."""
    seconds, expected = reference["sft_data"]
    edit_params(project, CHANGES["sft_data"][0], **CHANGES["sft_data"][1])
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    timer = threading.Timer(0.3 * seconds, signal.raise_signal, (signal.SIGHUP,))
    try:
        timer.start()
        run(project, "sft_data")
        timer.join()
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert content(project, "sft_data") == expected
