"""`offline_opd.runtime.cli`: after a successful stage that loaded vLLM, the process exits 0 without interpreter
teardown (where vLLM's threads can abort it and DVC would fail a finished stage); otherwise exit is normal, and
the exit status is the stage's own even after a Ctrl-C caught inside a string `exec`."""

import os
import subprocess
import sys

import pytest

from tests.tiny_models import REPO

SCRIPT = """
import atexit, sys, types
from pathlib import Path
if {vllm}:
    sys.modules["vllm"] = types.ModuleType("vllm")   # as if an engine had been loaded
atexit.register(lambda: Path({marker!r}).write_text("teardown ran"))
from offline_opd.runtime import cli
cli(lambda: print("stage output", flush=False))
"""


@pytest.mark.parametrize("vllm", [True, False])
def test_cli_skips_teardown_only_after_vllm_was_loaded(tmp_path, vllm):
    marker = tmp_path / "teardown"
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(vllm=vllm, marker=str(marker))], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stage output\n"   # buffered output is flushed before the hard exit
    assert marker.exists() != vllm


def test_cli_keeps_a_failing_stage_failing():
    script = "import sys, types; sys.modules['vllm'] = types.ModuleType('vllm')\n" \
             "from offline_opd.runtime import cli\ndef main():\n    raise SystemExit(2)\ncli(main)\n"
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120).returncode == 2


def test_a_ctrl_c_caught_inside_a_string_exec_does_not_turn_the_exit_status_into_sigint(tmp_path):
    """CPython remembers a KeyboardInterrupt that ended a string `exec` even when it was caught, and a `python -m`
    process then dies by SIGINT (-2) at exit: a stage stopped by Ctrl-C must still exit 130, as DVC reads it."""
    (tmp_path / "stage_like.py").write_text(
        "from offline_opd.runtime import cli\n"
        "def main():\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt', {})   # the Ctrl-C lands in code a library built from a string\n"
        "    except KeyboardInterrupt:\n"
        "        raise SystemExit(130)\n"
        "cli(main)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "pipeline")])}
    proc = subprocess.run([sys.executable, "-m", "stage_like"], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 130
