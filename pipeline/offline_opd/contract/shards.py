"""Writing and reading shards (docs/design.md §4): atomic writes, footer and schema checks, validated streaming reads.

Rollout shards hold one row per sampled response; teacher shards are the same rows plus the teacher's
columns, so `data/teacher_topk/part-i.parquet` is `data/rollouts/part-i.parquet` scored. The contract is
the package `offline_opd.contract`: columns and table builders in `tables`, footers in `footers`, entry
codecs in `codec`; this module is the one way shards reach the disk and come back, checked against them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from offline_opd.errors import UserError
from offline_opd.contract.footers import FOOTERS, REQUIRED_META, Footer
from offline_opd.contract.integrity import verify_sealed, write_sealed
from offline_opd.contract.tables import (DOMAIN_COLUMNS, READABLE_VERSIONS, ROLLOUT_SCHEMA, SCHEMA_VERSION, SFT_SCHEMA,
                                         TeacherFormat, current_names, has_domains, stored_name, teacher_format_of,
                                         teacher_schema, with_domains)

log = logging.getLogger("opd.shards")

META_PREFIX = "opd."
ROW_GROUP_SIZE = 256
COMPRESSION = "zstd"
# zstd level of the columns a codec asks a special encoding for (`TeacherFormat.encodings`): their byte
# planes compress 5 % better at 9 than at the default 1 (bench/shard_bytes.py), at a fraction of scoring time.
ENCODED_LEVEL = 9


class ShardError(UserError, ValueError):
    """A shard is missing, unreadable, or breaks the contract. The message names the file."""


_PART_RE = re.compile(r"part-(\d{5,})\.parquet")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def list_parts(folder: Path | str) -> list[Path]:
    """The files named exactly like parts (part-NNNNN.parquet), in part order."""
    found = [(m, p) for p in Path(folder).glob("part-*.parquet") if (m := _PART_RE.fullmatch(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: int(mp[0].group(1)))]


def run_parts(folder: Path | str, kind: str) -> list[Path]:
    """The parts in a shard folder that holds nothing else a Parquet reader would pick up.

    Every reader (distill, sft, teacher_topk, opd-inspect, DuckDB through `opd-inspect queries`) reads
    exactly these parts; a stray `.parquet` beside them (`part-00000 (copy).parquet`, `old.parquet`)
    would be read by a glob but not by the pipeline, so it is refused instead of silently ignored.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ShardError(f"{folder}: is a file, expected a folder of part-*.parquet {kind} shards")
    strays = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in (".parquet", ".pq")
                    and not p.name.startswith(".") and not _PART_RE.fullmatch(p.name)) if folder.is_dir() else []
    if strays:
        raise ShardError(f"{folder / strays[0]}: not a part of the `{kind}` run in {folder} (parts are named "
                         f"part-NNNNN.parquet{f'; {len(strays)} such files' if len(strays) > 1 else ''}); "
                         f"move it out of the folder: a reader globbing *.parquet would count it, the pipeline "
                         f"would not")
    return list_parts(folder)


def write_shard(path: Path | str, table: pa.Table, meta: Footer | Mapping[str, Any], schema: pa.Schema,
                encodings: Mapping[str, str] | None = None, before_replace: Callable[[], None] | None = None) -> Path:
    """Validate and write one shard atomically: a crash leaves no file that looks complete.

    `meta` (a typed footer, or key/values: non-string values are JSON-encoded) is written with the `opd.`
    prefix, plus the schema version (no time of writing: equal inputs give equal bytes). `encodings`: Parquet encodings per column
    (`TeacherFormat.encodings`), those columns compressed at ENCODED_LEVEL. The file gets
    page CRCs and a sealed whole-file checksum (offline_opd.contract.integrity). `before_replace` runs
    once the complete file is on disk under its temporary name, just before it takes its place
    (`PartPlan.clear_stale`: parts of another run go only when a part of this one is ready).
    """
    path = Path(path)
    table = table.select(schema.names).cast(schema)
    values = meta.to_meta() if isinstance(meta, Footer) else meta
    footer = {f"{META_PREFIX}{k}": (v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()}
    if (index := _PART_RE.fullmatch(path.name)) is not None:
        footer[f"{META_PREFIX}part"] = str(int(index.group(1)))   # a copy under another part's name is found
    footer.setdefault(f"{META_PREFIX}schema_version", SCHEMA_VERSION)
    table = table.replace_schema_metadata(footer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # Plain (dictionary off) float16 is what DuckDB reads; BYTE_STREAM_SPLIT float16 it does not.
        # Page CRCs let every read detect a flipped bit and name the file and row group (iter_row_groups).
        leaves = _leaf_paths(table.schema, encodings or {})
        write_sealed(tmp, table, compression=COMPRESSION, row_group_size=ROW_GROUP_SIZE,
                     use_dictionary=["sample_id", "prompt_id", *DOMAIN_COLUMNS],
                     write_statistics=["sample_id", "prompt_id", "prompt_len"],
                     column_encoding=leaves or None,
                     compression_level={name: ENCODED_LEVEL for name in leaves} or None)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # A writer killed outright (SIGKILL: no except runs; a Ray actor whose retry wrote this part) leaves its
    # temporary behind; this part supersedes it.
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    return path


def _leaf_paths(schema: pa.Schema, by_column: Mapping[str, str]) -> dict[str, str]:
    """Per-column settings keyed as pyarrow's writer names Parquet leaves (`col.list.element` for a list)."""
    out = {}
    for name, value in by_column.items():
        field = schema.field(name)
        out[f"{name}.list.element" if pa.types.is_list(field.type) else name] = value
    return out


def read_meta(path: Path | str) -> dict[str, str]:
    """The `opd.*` footer metadata of a shard, without the prefix."""
    path = Path(path)
    try:
        raw = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc}); delete it and rerun the stage") from exc
    return {k.decode()[len(META_PREFIX):]: v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)}


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    meta: dict[str, str]     # the footer's key/values as stored (strings); `footer` types them
    num_rows: int
    num_row_groups: int

    @property
    def footer(self) -> Footer:
        """The typed footer of the shard's kind (`footers.FOOTERS`)."""
        return FOOTERS[self.meta["kind"]].from_meta(self.meta)


def check_integrity(path: Path | str, kind: str | None = None) -> None:
    """The file is byte for byte what its writer sealed (or, written before seals existed, every page
    passes its CRC): a flipped, truncated or appended byte anywhere is a ShardError naming the file
    (and `kind`, the stage to rerun)."""
    path = Path(path)
    rerun = f"`dvc repro {kind}`" if kind else "the stage that wrote it"
    try:
        sealed = verify_sealed(path)
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())}); delete it and "
                         f"rerun {rerun}") from exc
    if sealed is None:
        verify_pages(path)
    elif not sealed:
        raise ShardError(f"{path}: its bytes do not match the checksum sealed in its footer (a flipped, lost or "
                         f"added byte): the file is corrupt: delete it and rerun {rerun}")


def open_shard(path: Path | str, kind: str, schema: pa.Schema | None = None) -> ShardInfo:
    """Check a shard's integrity, footer and schema against the contract before any training touches it."""
    path = Path(path)
    meta = read_meta(path)
    check_integrity(path, kind)
    if meta.get("kind", kind) != kind:
        raise ShardError(f"{path}: is a '{meta['kind']}' shard, expected '{kind}'")
    missing = [k for k in REQUIRED_META[kind] if k not in meta]
    if missing:
        raise ShardError(f"{path}: footer metadata lacks {', '.join(META_PREFIX + m for m in missing)}; "
                         f"it was not written by this pipeline's `{kind}` stage: rerun it")
    named = _PART_RE.fullmatch(path.name)
    if "part" in meta and named is not None and meta["part"] != str(int(named.group(1))):
        raise ShardError(f"{path}: holds part {meta['part']!r} of its run, not the part its name says (a copied "
                         f"part?); delete it and rerun the `{kind}` stage")
    if meta["schema_version"] not in READABLE_VERSIONS:
        raise ShardError(f"{path}: schema version {meta['schema_version']}, this code reads "
                         f"{', '.join(READABLE_VERSIONS)}; rerun the `{kind}` stage")
    pf = pq.ParquetFile(path)
    if schema is not None:  # in today's column names: a renamed column is looked up under its old name
        actual = pf.schema_arrow
        for field in schema:
            name = stored_name(field.name, meta["schema_version"])
            if name not in actual.names:
                raise ShardError(f"{path}: missing column '{name}' ({field.type}); rerun the `{kind}` stage")
            if not _same_type(actual.field(name).type, field.type):
                raise ShardError(f"{path}: column '{name}' has type {actual.field(name).type}, "
                                 f"expected {field.type}; rerun the `{kind}` stage")
    return ShardInfo(path, meta, pf.metadata.num_rows, pf.metadata.num_row_groups)


def open_run(folder: Path | str, kind: str, schema: pa.Schema,
             agree: tuple[str, ...] = ("run_key",)) -> list[ShardInfo]:
    """Every part of one complete run of stage `kind` in `folder`, footer- and schema-checked (`check_run`)."""
    folder = Path(folder)
    parts = run_parts(folder, kind)
    if not parts:
        raise ShardError(f"{folder}: no part-*.parquet {kind} shards; run the `{kind}` stage first (dvc repro {kind})")
    infos = [open_shard(p, kind, schema) for p in parts]
    check_run(folder, infos, kind, agree)
    return infos


def check_run(folder: Path, infos: list[ShardInfo], kind: str, agree: tuple[str, ...] = ("run_key",)) -> None:
    """The parts are one complete run of `kind`: one run key, all parts present, no row twice.

    A stage that consumes half a run would silently drop prompts, one that mixes two runs (say, rollouts
    of the same policy with another seed) would train on two sources, and a duplicated part would
    weigh its rows twice: the parts must agree on the footer keys `agree` (the run key at least), be
    exactly parts 0 .. num_parts-1 of the run their footers describe, and hold each row id once.
    """
    first = infos[0]
    for info in infos[1:]:
        for key in agree:
            if info.meta.get(key) != first.meta.get(key):
                raise ShardError(f"{folder}: parts disagree on {key}: {first.meta.get(key)} in {first.path.name} but "
                                 f"{info.meta.get(key)} in {info.path.name}; parts of two `{kind}` runs are mixed: "
                                 f"delete {folder} and rerun `dvc repro {kind}`")
    expected = [part_name(j) for j in range(int(first.meta.get("num_parts", len(infos))))]
    names = [i.path.name for i in infos]
    extra = sorted(set(names) - set(expected))
    if extra:
        raise ShardError(f"{folder / extra[0]}: not a part of the `{kind}` run in {folder}: its footers say "
                         f"{len(expected)} parts; a copied or left-over part? delete it, or rerun "
                         f"`dvc repro {kind}`")
    if names != expected:
        missing = sorted(set(expected) - set(names))
        raise ShardError(f"{folder}: the `{kind}` run is incomplete ({len(names)} parts, its footers say "
                         f"{len(expected)}; missing {', '.join(missing[:3]) or 'none'}); finish every "
                         f"`--shard i/n` of it, or rerun `dvc repro {kind}`")
    _check_unique_rows(folder, infos, kind)


def _check_unique_rows(folder: Path, infos: list[ShardInfo], kind: str) -> None:
    """Each row id (sample_id; prompt_id for sft_data, one answer per prompt) in one part, once."""
    column = "prompt_id" if kind == "sft_data" else "sample_id"
    ids = [pa.chunked_array([g.column(column).combine_chunks() for g in iter_row_groups(i, [column])], pa.string())
           for i in infos]
    whole = pa.chunked_array([c for part in ids for c in part.chunks], pa.string())
    if pc.count_distinct(whole).as_py() == len(whole):
        return
    seen: dict[str, Path] = {}
    for info, part in zip(infos, ids):
        for value in part.to_pylist():
            if value in seen:
                raise ShardError(f"{info.path}: {column} {value!r} is also in {seen[value].name}; rows are "
                                 f"duplicated (a copied part?): delete {folder} and rerun `dvc repro {kind}`")
            seen[value] = info.path


def open_teacher_shards(folder: Path | str) -> list[ShardInfo]:
    """Every part of one complete teacher_topk run in `folder`, footer- and schema-checked (`check_run`).

    Each shard is checked against the schema of the format its footer records (codec, sampled
    entries, exact tail). Version 1 shards (no exact tail) are read with a warning: their tail mass
    is rebuilt as 1 - Σ exp(top-k), which is off by nats where the true tail is below ~1e-4.
    """
    folder = Path(folder)
    parts = run_parts(folder, "teacher_topk")
    if not parts:
        raise ShardError(f"{folder}: no part-*.parquet teacher shards; run the `teacher_topk` stage")
    infos = [open_shard(p, "teacher_topk", teacher_schema(shard_format(p, meta := read_meta(p)), has_domains(meta)))
             for p in parts]
    check_run(folder, infos, "teacher_topk")
    old = [i.path.name for i in infos if i.meta["schema_version"] == "1"]
    if old:
        warnings.warn(f"{folder}: {len(old)} teacher shard(s) of schema version 1 ({old[0]}, ...) store no exact "
                      f"tail; the tail mass is rebuilt from the top-k, which is inaccurate where it is small: "
                      f"rerun `dvc repro teacher_topk` to store it", stacklevel=2)
    return infos


def shard_format(path: Path, meta: dict[str, str]) -> TeacherFormat:
    """The teacher format a shard's footer describes (`tables.teacher_format_of`), or a ShardError naming the file
    when this code cannot read it (a newer schema version or codec)."""
    if meta.get("schema_version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: schema version {meta.get('schema_version')}, this code reads "
                         f"{', '.join(READABLE_VERSIONS)}; rerun the `teacher_topk` stage")
    try:
        return teacher_format_of(path, meta)
    except (ValueError, TypeError, KeyError, OSError, pa.ArrowException) as exc:
        raise ShardError(f"{path}: footer key {META_PREFIX}codec does not describe a codec this code reads "
                         f"({exc}); rerun the `teacher_topk` stage") from exc


def teacher_format(infos: list[ShardInfo]) -> TeacherFormat:
    """The format every shard of one run shares (one batch holds one [B, T, W] tensor, one codec)."""
    formats = [shard_format(i.path, i.meta) for i in infos]
    for info, fmt in zip(infos, formats):
        if fmt != formats[0]:
            raise ShardError(f"{info.path}: stores {fmt} but {infos[0].path} stores {formats[0]}; shards of one "
                             f"run must share k, codec and selection: rerun the `teacher_topk` stage")
    return formats[0]


def check_folder(folder: Path | str) -> list[ShardInfo]:
    """`opd-inspect check DIR`: the parts in `folder`, of whichever kind their footers name, are one run."""
    folder = Path(folder)
    if not folder.exists():
        raise ShardError(f"{folder}: no such shard folder; run the stage that writes it (`dvc repro`)")
    parts = run_parts(folder, "shard")
    if not parts:
        raise ShardError(f"{folder}: no part-*.parquet shards")
    kind = read_meta(parts[0]).get("kind")
    if kind == "teacher_topk":
        return open_teacher_shards(folder)
    if kind not in ("rollouts", "sft_data"):
        raise ShardError(f"{parts[0]}: footer kind {kind!r} is not one of rollouts, teacher_topk, sft_data")
    return open_run(folder, kind, ROLLOUT_SCHEMA if kind == "rollouts" else
                    with_domains(SFT_SCHEMA, has_domains(read_meta(parts[0]))))


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Type equality that ignores list item field names ('item' vs 'element' differ across writers)."""
    if pa.types.is_list(a) and pa.types.is_list(b):
        return a.value_type.equals(b.value_type)
    return a.equals(b)


def iter_row_groups(info: ShardInfo, columns: list[str] | None = None,
                    groups: list[int] | None = None) -> Iterator[pa.Table]:
    """Stream a shard one row group at a time, columns under today's names (`tables.RENAMED`); a truncated or
    corrupt group names the file."""
    pf = pq.ParquetFile(info.path, page_checksum_verification=True)
    version = info.meta.get("schema_version", SCHEMA_VERSION)
    stored = None if columns is None else [stored_name(c, version) for c in columns]
    for g in range(info.num_row_groups) if groups is None else groups:
        try:
            yield current_names(pf.read_row_group(g, columns=stored), version)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{info.path}: row group {g} is unreadable ({exc}); the file is corrupt or "
                             f"truncated: delete it and rerun the stage that wrote it") from exc


def verify_pages(path: Path | str) -> int:
    """Read every page of a shard, checking its CRC (and decompression): the number of row groups read.

    A full read, so it costs one pass of I/O; the ShardError names the file and the row group.
    """
    path = Path(path)
    meta = read_meta(path)  # a broken footer is a ShardError naming the file
    info = ShardInfo(path, meta, 0, pq.read_metadata(path).num_row_groups)
    for _ in iter_row_groups(info):
        pass
    return info.num_row_groups


def finished_parts(folder: Path | str, kind: str, run_key: str,
                   only: Collection[str] | None = None) -> tuple[set[str], list[Path]]:
    """Names of parts already complete for this exact run (resume skips them), and the parts that are not.

    A part counts only if it is intact (its sealed checksum, or its page CRCs, match: a flipped byte
    makes it a part to redo, never a finished one), its footer is this pipeline's, its schema version
    this code's, and its `run_key`
    (a hash of the stage's settings and input fingerprints) matches: parts left by a crashed run
    resume. The others (other settings, corrupt) are returned to be removed once this run has a part
    ready to replace them (`PartPlan.clear_stale`), so a run that fails before that leaves them as they
    were. Half-written temporaries are never good output and are deleted now. `only` limits all of
    this to the part names a process owns, so processes filling one folder with `--shard i/n` never
    touch each other's parts or temporaries mid-write.
    """
    folder = Path(folder)
    for tmp in folder.glob(".part-*.tmp-*"):
        if only is None or tmp.name[1:].split(".tmp-")[0] in only:
            tmp.unlink(missing_ok=True)
    done, stale = set(), []
    for path in list_parts(folder):
        if only is not None and path.name not in only:
            continue
        try:
            meta = open_shard(path, kind).meta
            ok = meta.get("run_key") == run_key and meta["schema_version"] == SCHEMA_VERSION
        except ShardError as exc:
            log.warning("%s; it will be written again", exc)
            ok = False
        if ok:
            done.add(path.name)
        else:
            stale.append(path)
    return done, stale


def make_run_key(**inputs: Any) -> str:
    """The resume key of a stage run: a hash of its settings and input fingerprints (JSON-able values)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class PartPlan:
    """This process's parts still to write (`todo`), and the files its run replaces (`stale`).

    Nothing in `stale` is removed until `clear_stale` runs: pass it as `write_shard(...,
    before_replace=plan.clear_stale)`, so the first part of this run that is complete on disk takes
    the old parts' place, and call it directly when nothing is left to write. A run that fails on its
    way there (a model that does not load, a setting that fails on the first batch, a full disk)
    leaves the previous run's parts as they were.
    """

    folder: Path
    todo: list[int]
    stale: list[Path] = field(default_factory=list)

    def clear_stale(self) -> None:
        for path in self.stale:
            path.unlink(missing_ok=True)
        self.stale = []

    def replaced_by(self, part: int) -> Callable[[], None]:
        """`before_replace` for part `part` when several processes write this plan's parts at once (a Ray actor
        pool, offline_opd.backends.pool): it removes the stale files that no part of this run will take the
        place of, and the one under this part's own name. A stale file under another part's name is left to
        that part's writer, who replaces it: another process may already have put the new part there, which
        `clear_stale` would delete. A run that fails midway thus leaves old parts where it had not yet
        written (readers refuse the mixed folder; the rerun replaces them)."""
        others = {part_name(j) for j in self.todo} - {part_name(part)}

        def clear() -> None:
            for path in self.stale:
                if path.name not in others:
                    path.unlink(missing_ok=True)
        return clear


def pending_parts(folder: Path | str, kind: str, run_key: str, n_parts: int,
                  shard: tuple[int, int] = (0, 1)) -> PartPlan:
    """This process's parts (index % n == i) still to write for a run of `n_parts` parts, and what they replace.

    The replaced files are this process's stale and corrupt parts (`finished_parts`) and its parts
    numbered `n_parts` or more, left by an earlier run that had more, so the folder ends up holding
    exactly this run's parts. A stray `.parquet` in the folder is refused first (`run_parts`): no
    reader would accept the folder with it.
    """
    i, n = shard
    folder = Path(folder)
    existing = {int(m.group(1)): p for p in run_parts(folder, kind) if (m := _PART_RE.fullmatch(p.name))}
    owned = {part_name(j) for j in set(range(n_parts)) | set(existing) if j % n == i}
    done, stale = finished_parts(folder, kind, run_key, only=owned)
    stale += [path for j, path in existing.items() if j >= n_parts and j % n == i and path not in stale]
    return PartPlan(folder, [j for j in range(i, n_parts, n) if part_name(j) not in done], stale)

