"""What checking a teacher shard's integrity costs, against reading it.

Every reader now checks each part before using it (offline_opd.contract.shards.check_integrity: the whole-file
sha256 sealed in the footer, offline_opd.contract.integrity), resume checks every finished part the same way,
and distill's streaming reads verify Parquet page CRCs as they go. This times, on synthetic teacher shards of
the default's shape (k = 8, float16, 256-row row groups, about 33 response tokens per row), per shard size:

* `read`: every row group read in turn (decompress + decode), no checks: the baseline;
* `read+crc`: the same with page_checksum_verification (what `verify_pages` and distill's reads do);
* `seal`: check_integrity (one sequential sha256 pass over the file, no decoding);
* `write` / `write+crc` / `write+crc+seal`: pq.write_table as before page CRCs, with them, and what
  write_shard does now (CRCs, then the sealing pass that hashes the file once and patches the footer).

Each timing is the best of --repeats runs, the file warm in the page cache (a cold read adds the same disk
time to every column). Ratios are against `read` / `write` measured in the same run.

    PYTHONPATH=pipeline:kernels:. python bench/integrity_cost.py [--rows 1024 16384] [--repeats 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from offline_opd.contract import integrity, shards, tables
from offline_opd.contract.footers import TeacherTopkFooter

K, VOCAB, PROMPT, RESPONSE = 8, 100, 12, 33   # the embedded default's shape: ~33 response tokens per row


def teacher_table(rows: int, seed: int = 0) -> pa.Table:
    """`rows` rows of a k = 8 teacher shard over the toy vocabulary, random but shaped like the default's."""
    rng = np.random.default_rng(seed)
    logp = np.log(rng.dirichlet(np.full(VOCAB, 0.05), size=(rows, RESPONSE)).astype(np.float32) + 1e-30)
    top = np.argsort(-logp, axis=2)[:, :, :K]
    ids = rng.integers(4, VOCAB, (rows, PROMPT + RESPONSE)).astype(np.int32)

    def lists(a: np.ndarray, t: pa.DataType) -> pa.Array:
        flat = a.reshape(rows, -1)
        return pa.ListArray.from_arrays(pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)),
                                        pa.array(flat.reshape(-1), t))

    tail = np.log1p(-np.minimum(np.exp(np.take_along_axis(logp, top, 2)).sum(2), 1 - 1e-6))
    return pa.table({
        "sample_id": [f"s{i:06d}#0" for i in range(rows)], "prompt_id": [f"s{i:06d}" for i in range(rows)],
        "input_ids": lists(ids, pa.int32()), "prompt_len": pa.array(np.full(rows, PROMPT, np.int32)),
        "behavior_logprob": lists(-rng.random((rows, RESPONSE)).astype(np.float32), pa.float32()),
        "teacher_logprob": lists(np.take_along_axis(logp, ids[:, PROMPT:, None], 2)[..., 0], pa.float32()),
        "tail_logprob": lists(tail.astype(np.float32), pa.float32()),
        "topk_ids": lists(top.astype(np.int32), pa.int32()),
        "topk_logprobs": lists(np.take_along_axis(logp, top, 2).astype(np.float16), pa.float16()),
    })


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all(pf: pq.ParquetFile) -> list[pa.Table]:
    return [pf.read_row_group(g) for g in range(pf.metadata.num_row_groups)]


def measure(rows: int, repeats: int, folder: Path) -> dict[str, float]:
    table = teacher_table(rows)
    schema = tables.teacher_schema("float16")
    footer = TeacherTopkFooter(backend="hf", backend_version="bench", tokenizer_fingerprint="c" * 16,
                               teacher_fingerprint="a" * 16, policy_fingerprint="b" * 16, k=8, scoring_temperature=1.0,
                               privileged_context=None, run_key="bench", teacher_path="t", policy_path="p")
    path = shards.write_shard(folder / shards.part_name(0), table, footer, schema)
    plain = folder / "plain.parquet"
    cast = table.select(schema.names).cast(schema)
    options = dict(compression=shards.COMPRESSION, row_group_size=shards.ROW_GROUP_SIZE,
                   use_dictionary=["sample_id", "prompt_id"])
    return {
        "MB": path.stat().st_size / 1e6,
        "read": best(lambda: read_all(pq.ParquetFile(path)), repeats),
        "read+crc": best(lambda: read_all(pq.ParquetFile(path, page_checksum_verification=True)), repeats),
        "seal": best(lambda: shards.check_integrity(path), repeats),
        "write": best(lambda: pq.write_table(cast, plain, **options), repeats),
        "write+crc": best(lambda: pq.write_table(cast, plain, write_page_checksum=True, **options), repeats),
        "write+crc+seal": best(lambda: integrity.write_sealed(plain, cast, **options), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 16384],
                        help="rows per shard (1024: a part of the embedded default)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"{'rows':>6} {'MB':>6} {'read s':>8} {'read+crc':>9} {'seal':>7} {'write s':>8} {'w+crc':>7} "
          f"{'w+crc+seal':>10}   (ratios: to read, to write)")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            m = measure(rows, args.repeats, Path(tmp))
            r, w = m["read"], m["write"]
            print(f"{rows:>6} {m['MB']:>6.2f} {r:>8.4f} {m['read+crc'] / r:>8.2f}x {m['seal'] / r:>6.2f}x "
                  f"{w:>8.4f} {m['write+crc'] / w:>6.2f}x {m['write+crc+seal'] / w:>9.2f}x")


if __name__ == "__main__":
    main()
