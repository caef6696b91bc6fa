"""Atomic outputs: a stage's output appears complete or not at all, never half-written."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `dest`, on error it is removed."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    os.replace(tmp, dest)


def write_text(path: Path | str, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
