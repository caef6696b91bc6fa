"""A whole-file checksum sealed into every Parquet file the pipeline writes, and its verification.

Parquet's page CRCs (written too, and checked on every streaming read) cover the data pages only: a
flipped byte in the footer (the `opd.*` provenance, column statistics, row-group offsets) reads back
as a different value without any error, and DuckDB does not check page CRCs at all. So every file
also carries `opd.file_sha256`, the sha256 of the whole file as written with that value still a
fixed-width placeholder; the value is then patched into the footer in place (same length, so no
offset moves). Verifying hashes the file with the value put back to the placeholder: any changed,
missing or added byte anywhere, the checksum itself included, is a mismatch. One sequential read
of the file (`bench/integrity_cost.py` measures it against the page-CRC pass and a plain read).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DIGEST_KEY = "opd.file_sha256"
PLACEHOLDER = b"opd-file-sha256-not-sealed-yet".ljust(64, b"-")
BLOCK = 1 << 23
TAIL = 8  # 4-byte footer length + b"PAR1"


def write_sealed(path: Path | str, table: pa.Table, **options: Any) -> Path:
    """Write `table` to `path` (a temporary name: the caller renames it into place) with page CRCs and
    the sealed whole-file checksum in its footer."""
    path = Path(path)
    meta = {**(table.schema.metadata or {}), DIGEST_KEY.encode(): PLACEHOLDER}
    pq.write_table(table.replace_schema_metadata(meta), path, write_page_checksum=True, **options)
    with open(path, "r+b") as f:
        start, footer = _footer(f, path)
        if footer.count(PLACEHOLDER) != 1:
            raise RuntimeError(f"{path}: the checksum placeholder is not in the footer exactly once")
        digest = _digest(f, start, footer).encode()
        f.seek(start + footer.index(PLACEHOLDER))
        f.write(digest)
    return path


def recorded_digest(path: Path | str) -> str | None:
    """The sealed checksum of a Parquet file, or None for a file written without one."""
    raw = pq.read_metadata(path).metadata or {}
    value = raw.get(DIGEST_KEY.encode())
    return value.decode("ascii", "replace") if value is not None else None


def verify_sealed(path: Path | str) -> bool | None:
    """True if the file matches its sealed checksum, False if it does not, None if it has none.

    Raises OSError / ArrowException for a file that is not Parquet at all (the caller names it).
    """
    path = Path(path)
    recorded = recorded_digest(path)
    if recorded is None:
        return None
    with open(path, "rb") as f:
        start, footer = _footer(f, path)
        value = recorded.encode()
        if len(value) != len(PLACEHOLDER) or footer.count(value) != 1:
            return False
        return _digest(f, start, footer.replace(value, PLACEHOLDER)) == recorded


def _footer(f, path: Path) -> tuple[int, bytes]:
    """Where the footer starts, and the footer with its length and magic (the file's last bytes)."""
    size = f.seek(0, 2)
    if size < 12:
        raise OSError(f"{path}: {size} bytes, too short for Parquet")
    f.seek(size - TAIL)
    length, magic = struct.unpack("<I4s", f.read(TAIL))
    start = size - TAIL - length
    if magic != b"PAR1" or start < 4:
        raise OSError(f"{path}: no Parquet footer at the end of the file")
    f.seek(start)
    return start, f.read(length + TAIL)


def _digest(f, start: int, footer: bytes) -> str:
    """sha256 of the bytes before the footer, then of `footer` (the file's own, or with the value replaced)."""
    h = hashlib.sha256()
    f.seek(0)
    left = start
    while left:
        block = f.read(min(BLOCK, left))
        if not block:
            raise OSError("the file shrank while it was being read")
        h.update(block)
        left -= len(block)
    h.update(footer)
    return h.hexdigest()
