"""Teacher shards at real vocabularies: bytes per stored entry per codec and k, what each codec changes in the
losses, and what decoding a batch costs next to a distill step. One run prints the tables and writes
bench/results/shard_bytes.json.

Sources (each scored once at the largest k; a smaller k is the first k entries, its tail the exact fp32
tail of the largest k plus the dropped entries, summed in float64):

* `--run PROJECT`: a pipeline project after `dvc repro rollouts` (for the issue: the SmolLM2 preset,
  configs/smollm2.yaml, V = 49,152, 256 rollouts of the pruned π_ref on the addition prompts). Its teacher
  (data/models/teacher) scores every rollout token on the CPU in fp32, as `teacher_topk` does.
* synthetic, V = 151,936 (Qwen2/3's vocabulary size), `--synthetic-positions` positions: a Zipf prior
  over ids, log π(r) = −1.1 log(r + 10) for the r-th most frequent token, and per position logits
  z = 0.7 log π + 1.5 ε (ε standard normal per id) plus four context tokens drawn from the prior with boosts
  12, 9, 7, 5 nats (+ 2 ε): a peaked teacher whose top-1 holds 0.74 of the mass on average and whose
  top-32 leaves 0.14 in the tail (SmolLM2 here: 0.53 and 0.11; both are printed). Ids are assigned as a BPE
  vocabulary assigns them, frequent tokens low but not in order: id = rank of r·e^{N(0,1)} (`bpe`;
  SmolLM2's top-32 ids here have a median of 803 of 49,152). `random` assigns ids to ranks at random,
  which no BPE vocabulary does: the worst case, shown for what it costs. The sampled token of each
  position is drawn from the teacher distribution.

Formats, each written with the pipeline's writer (`tables.scored_table` + `shards.write_shard`: zstd, page
checksums, the codec's column encodings): `plain` fp16 (the default), `q8`, `q16`, `compact`.

Columns: `B/entry` = bytes of the entry columns per stored entry: ids + log-prob codes + per-position
columns (q8/q16 `topk_lpmax`, compact `topk_lp_top`), then each of the three; `tail+tok` = bytes of
`tail_logprob` + `teacher_logprob`, per entry and per response token; `file` = the whole file per response
token; `max|dlp|` = the largest log-prob error over all stored entries (saturated q8/q16 codes dominate);
then, for `--run` only, the per-token fkl, rkl and jsd of π_ref (data/models/student_sft) to each format's
targets as the mean |difference| to the same loss on `plain` (fp16) targets, and to the exact fp32 scores.

Decode vs step (`--run` only): reading + decoding one distill batch (`distill.batch_size` rows of the k =
max(ks) shard, `train.shard_data.collate`: decode, pad, tensors) against one distill step on that batch
(π_ref forward + backward + AdamW update, the project's `distill` settings), both on one CPU thread (the
pipeline's thread policy), median of several; the ratio is printed per codec.

    nice -n 10 python bench/shard_bytes.py --run /path/to/smollm2/project      # ~15 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from opd_kernels import sparse_divergence
from offline_opd.backends.engine import load_engine
from offline_opd.backends.base import Scored
from offline_opd.config import EngineConfig, load_section
from offline_opd.contract import shards
from offline_opd.contract.codec import make_codec
from offline_opd.contract.footers import TeacherTopkFooter
from offline_opd.contract.sparse_targets import TAIL_FLOOR
from offline_opd.contract.tables import ROLLOUT_SCHEMA, TeacherFormat, scored_table, teacher_schema

CODECS = ("plain", "q8", "q16", "compact")
PER_POSITION = ("topk_lpmax", "topk_lp_top")
CODES = ("topk_logprobs", "topk_lpq", "topk_lp_code")
IDS = ("topk_ids", "topk_id_delta")
TAIL_AND_TOKEN = ("tail_logprob", "teacher_logprob")
MODES = ("fkl", "rkl", "jsd")
QWEN_VOCAB = 151_936
RESULTS = Path(__file__).resolve().parent / "results" / "shard_bytes.json"


@dataclass
class Source:
    """Scored rollouts of one vocabulary: rollout tables and, per table, one Scored per row at k = max(ks)."""

    key: str                   # the JSON key: vocab_<V>[...]
    label: str
    vocab: int
    rollouts: list[pa.Table]
    scored: list[list[Scored]]
    stats: dict[str, float]


# ---------------------------------------------------------------------------------------------- sources


def hf_scorer(model: Path):
    """The hf engine in fp32 on the CPU, as `teacher_topk` runs it there."""
    return load_engine(model, EngineConfig("hf", 512, "float32", 1 << 16, 1.0), "bench", device="cpu")


def real_source(run: Path, k: int) -> Source:
    parts = shards.open_run(run / "data/rollouts", "rollouts", ROLLOUT_SCHEMA)
    rollouts = [pa.concat_tables(shards.iter_row_groups(p)) for p in parts]
    scorer = hf_scorer(run / "data/models/teacher")
    vocab = scorer.model.config.get_text_config().vocab_size
    scored = [scorer.score(t["input_ids"].to_pylist(), t["prompt_len"].to_pylist(), k=k) for t in rollouts]
    scorer.close()
    return Source(f"vocab_{vocab}", f"{run.name}: its teacher on {sum(t.num_rows for t in rollouts)} rollouts",
                  vocab, rollouts, scored, stats_of(scored))


def synthetic_source(vocab: int, positions: int, k: int, mapping: str, seed: int = 0, chunk: int = 128) -> Source:
    """The generator of the module docstring: rows of 16 response tokens after an 8-token prompt."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(vocab)
    log_prior = -1.1 * np.log(ranks + 10.0)
    rank_of_id = rng.permutation(vocab) if mapping == "random" else \
        np.argsort(np.argsort(ranks * np.exp(rng.normal(0.0, 1.0, vocab))))
    prior = torch.from_numpy(log_prior[rank_of_id]).float()      # prior log-weight of each id
    p_prior = torch.softmax(prior, 0)
    g = torch.Generator().manual_seed(seed)
    ids, lps, tails, sampled, sampled_lp = [], [], [], [], []
    for start in range(0, positions, chunk):
        m = min(chunk, positions - start)
        z = 0.7 * prior + 1.5 * torch.randn(m, vocab, generator=g)
        context = torch.multinomial(p_prior, m * 4, replacement=True, generator=g).view(m, 4)
        z.scatter_add_(1, context, torch.tensor([12.0, 9.0, 7.0, 5.0]) + 2.0 * torch.randn(m, 4, generator=g))
        lp = torch.log_softmax(z, 1)
        top = lp.topk(k, 1)
        tails.append(torch.logsumexp(lp.scatter(1, top.indices, -math.inf), 1).clamp(min=TAIL_FLOOR))
        token = torch.multinomial(lp.exp(), 1, generator=g)
        ids.append(top.indices.int())
        lps.append(top.values)
        sampled.append(token[:, 0])
        sampled_lp.append(lp.gather(1, token)[:, 0])
    ids_, lps_, tails_ = (torch.cat(x).numpy() for x in (ids, lps, tails))
    sampled_, sampled_lp_ = torch.cat(sampled).numpy(), torch.cat(sampled_lp).numpy()
    rows, scored = [], []
    for r, s in enumerate(range(0, positions, 16)):
        e = min(s + 16, positions)
        prompt = rng.integers(0, vocab, 8).astype(np.int32).tolist()
        rows.append({"sample_id": f"s{r:05d}", "prompt_id": f"p{r:05d}", "input_ids": prompt + sampled_[s:e].tolist(),
                     "prompt_len": 8, "behavior_logprob": (-rng.random(e - s) * 3).astype(np.float32).tolist()})
        scored.append(Scored(sampled_lp_[s:e].astype(np.float32), ids_[s:e], lps_[s:e].astype(np.float32),
                             tails_[s:e].astype(np.float32)))
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    label = f"synthetic, Zipf prior, {'random ids (worst case)' if mapping == 'random' else 'BPE-like ids'}"
    key = f"vocab_{vocab}" + ("_random_ids" if mapping == "random" else "")
    return Source(key, label, vocab, [table], [scored], stats_of([scored]))


def stats_of(scored: list[list[Scored]]) -> dict[str, float]:
    ids = np.concatenate([s.topk_ids for part in scored for s in part])
    lps = np.concatenate([s.topk_logprobs for part in scored for s in part])
    tail = np.concatenate([s.tail_logprob for part in scored for s in part])
    _, counts = np.unique(ids, return_counts=True)
    p = counts / counts.sum()
    return {"positions": int(len(ids)), "top1_mass": float(np.exp(lps[:, 0]).mean()),
            "tail_mass_at_max_k": float(np.exp(tail.astype(np.float64)).mean()),
            "median_id": float(np.median(ids)), "id_entropy_bits": float(-(p * np.log2(p)).sum())}


def truncate(scored: list[Scored], k: int) -> list[Scored]:
    """The top-k of scores taken at a larger k: the first k entries, the dropped ones added to the tail."""
    out = []
    for s in scored:
        rest = np.concatenate([s.tail_logprob[:, None], s.topk_logprobs[:, k:]], 1).astype(np.float64)
        top = rest.max(1, keepdims=True)
        tail = top[:, 0] + np.log(np.exp(rest - top).sum(1))
        out.append(Scored(s.teacher_logprob, s.topk_ids[:, :k], s.topk_logprobs[:, :k],
                          np.maximum(tail, TAIL_FLOOR).astype(np.float32)))
    return out


# ---------------------------------------------------------------------------------------------- measures


def formats(k: int, vocab: int) -> dict[str, TeacherFormat]:
    return {name: TeacherFormat(make_codec(name, "float16", vocab), k, 0, exact_tail=True) for name in CODECS}


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over row groups (from the footer)."""
    meta = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def write(folder: Path, source: Source, scored: list[list[Scored]], fmt: TeacherFormat) -> list[Path]:
    footer = TeacherTopkFooter(backend="hf", backend_version="bench", teacher_fingerprint="bench",
                               policy_fingerprint="bench", tokenizer_fingerprint="bench", k=fmt.width,
                               scoring_temperature=1.0, privileged_context=None, codec=fmt.codec.describe(),
                               width=fmt.width, samples=0)
    return [shards.write_shard(folder / shards.part_name(j), scored_table(table, part, fmt), footer,
                               teacher_schema(fmt), fmt.encodings())
            for j, (table, part) in enumerate(zip(source.rollouts, scored))]


def sizes(paths: list[Path], tokens: int, k: int) -> dict[str, float]:
    cols: dict[str, int] = {}
    for path in paths:
        for c, b in column_bytes(path).items():
            cols[c] = cols.get(c, 0) + b
    part = {what: sum(cols.get(c, 0) for c in names) for what, names in
            (("ids", IDS), ("codes", CODES), ("per_position", PER_POSITION), ("tail_and_sampled", TAIL_AND_TOKEN))}
    entries = tokens * k
    return {"bytes_per_entry": (part["ids"] + part["codes"] + part["per_position"]) / entries,
            "ids": part["ids"] / entries, "codes": part["codes"] / entries,
            "per_position": part["per_position"] / entries,
            "tail_and_sampled_per_entry": part["tail_and_sampled"] / entries,
            "tail_and_sampled_per_token": part["tail_and_sampled"] / tokens,
            "file_per_token": sum(p.stat().st_size for p in paths) / tokens}


def decode_all(paths: list[Path], fmt: TeacherFormat) -> dict[str, np.ndarray]:
    parts = [fmt.decode(pq.read_table(p)) for p in paths]
    return {key: np.concatenate([d[key] for d in parts]) for key in ("topk_ids", "topk_logprobs", "tail_logprob")}


def max_error(dec: dict[str, np.ndarray], scored: list[list[Scored]]) -> float:
    """The largest |decoded − scored| log-prob, matching entries by id (compact stores them in id order)."""
    ids = np.concatenate([s.topk_ids for part in scored for s in part]).astype(np.int64)
    lps = np.concatenate([s.topk_logprobs for part in scored for s in part]).astype(np.float64)
    order_a, order_b = np.argsort(ids, 1), np.argsort(dec["topk_ids"].astype(np.int64), 1)
    want = np.take_along_axis(lps, order_a, 1)
    got = np.take_along_axis(dec["topk_logprobs"].astype(np.float64), order_b, 1)
    assert (np.take_along_axis(ids, order_a, 1) == np.take_along_axis(dec["topk_ids"], order_b, 1)).all()
    return float(np.abs(got - want).max())


def student_logits(model_dir: Path, rollouts: list[pa.Table], batch: int = 8) -> torch.Tensor:
    """π_ref's logits [tokens, V] at every response position, in the shards' row-major order (fp32)."""
    from offline_opd.train.trainer import load_for_training

    model = load_for_training(model_dir, "32-true").model
    model.eval()
    out = []
    with torch.no_grad():
        for table in rollouts:
            ids, plens = table["input_ids"].to_pylist(), table["prompt_len"].to_pylist()
            for s in range(0, len(ids), batch):
                rows = ids[s:s + batch]
                width = max(map(len, rows))
                x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
                logits = model(input_ids=x, attention_mask=mask).logits
                out += [logits[i, p - 1:len(r) - 1].float() for i, (r, p) in enumerate(zip(rows, plens[s:s + batch]))]
    return torch.cat(out)


def token_losses(logits: torch.Tensor, dec: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    ids, lps = torch.from_numpy(dec["topk_ids"]), torch.from_numpy(dec["topk_logprobs"]).float()
    tail = torch.from_numpy(dec["tail_logprob"]).float()
    return {m: sparse_divergence(logits, ids, lps, m, tail_logprob=tail, backend="torch").double() for m in MODES}


# ---------------------------------------------------------------------------------------------- decode vs step


def decode_vs_step(run: Path, paths: dict[str, list[Path]], fmts: dict[str, TeacherFormat],
                   repeats: int = 5) -> dict[str, Any]:
    """Seconds to read + decode one distill batch per codec, and of one distill step on such a batch."""
    from offline_opd.config import DistillConfig
    from offline_opd.train.losses import loss_from_config
    from offline_opd.train.module import TrainModule
    from offline_opd.train.shard_data import collate
    from offline_opd.train.trainer import load_for_training

    cfg: DistillConfig = load_section("distill", run / "params.yaml")
    rows = cfg.batch_size
    out: dict[str, Any] = {"batch_rows": rows, "threads": torch.get_num_threads()}
    batches = {}
    for name, fmt in fmts.items():
        read, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            info = shards.open_shard(paths[name][0], "teacher_topk")
            table = pa.concat_tables(shards.iter_row_groups(info))
            t1 = time.perf_counter()
            n = table.num_rows // rows
            for b in range(n):
                collate(table.slice(b * rows, rows), fmt)
            t2 = time.perf_counter()
            read.append((t1 - t0) / n)
            dec.append((t2 - t1) / n)
        batches[name] = [collate(table.slice(b * rows, rows), fmt) for b in range(repeats + 1)]
        entries = int(np.sum(batches[name][0]["topk_ids"].numpy() >= 0))
        out[name] = {"read_s": statistics.median(read), "decode_s": statistics.median(dec),
                     "entries_per_batch": entries, "entries_per_s": entries / statistics.median(dec)}
    model = load_for_training(run / "data/models/student_sft", cfg.precision).model
    module = TrainModule(model, cfg, loss_from_config(cfg, "bench: distill"))
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps = []
    for batch in batches["compact"]:
        t0 = time.perf_counter()
        module.compute_loss(batch).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(steps[1:])   # the first step allocates the optimizer state
    out["loss"] = cfg.loss
    for name in fmts:
        out[name]["ratio"] = (out[name]["read_s"] + out[name]["decode_s"]) / out["step_s"]
    return out


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="project after `dvc repro rollouts` (smollm2 preset)")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--synthetic-positions", type=int, default=4096)
    parser.add_argument("--mappings", nargs="*", default=["bpe", "random"], choices=["bpe", "random"],
                        help="synthetic id assignments (none: no synthetic source)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    k_max = max(args.ks)
    t_start = time.perf_counter()
    sources = [real_source(args.run, k_max)] if args.run else []
    sources += [synthetic_source(QWEN_VOCAB, args.synthetic_positions, k_max, m) for m in args.mappings]
    result: dict[str, Any] = {
        "command": "python bench/shard_bytes.py " + " ".join(
            ([f"--run {args.run.name}"] if args.run else []) + ["--ks", *map(str, args.ks)]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread, "
                   f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start"}
    decode_paths: dict[str, list[Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            tokens = src.stats["positions"]
            entry = result[src.key] = {"source": src.label, "vocab": src.vocab, "statistics": src.stats}
            print(f"\n## {src.key}: {src.label}; V = {src.vocab:,}, {tokens:,} response positions; top-1 mass "
                  f"{src.stats['top1_mass']:.2f}, tail after top-{k_max} {src.stats['tail_mass_at_max_k']:.3f}, "
                  f"median id {src.stats['median_id']:.0f}, id entropy {src.stats['id_entropy_bits']:.1f} bits")
            real = args.run is not None and src is sources[0]
            logits = student_logits(args.run / "data/models/student_sft", src.rollouts) if real else None
            head = (f"{'k':>3} {'codec':<8} {'B/entry':>8} {'ids':>6} {'codes':>6} {'per-pos':>7} {'tail+tok':>8} "
                    f"{'B/token':>8} {'file':>7} {'max|dlp|':>9}")
            if logits is not None:
                head += "".join(f" {'|d' + m + '| plain':>13} {'|d' + m + '| exact':>13}" for m in MODES)
            print(head)
            for k in args.ks:
                scored = [truncate(part, k) for part in src.scored]
                exact = None
                if logits is not None:
                    exact = token_losses(logits, {
                        "topk_ids": np.concatenate([s.topk_ids for part in scored for s in part]),
                        "topk_logprobs": np.concatenate([s.topk_logprobs for part in scored for s in part]),
                        "tail_logprob": np.concatenate([s.tail_logprob for part in scored for s in part])})
                plain = None
                for name, fmt in formats(k, src.vocab).items():
                    folder = Path(tmp) / src.key / f"k{k}" / name
                    paths = write(folder, src, scored, fmt)
                    row = sizes(paths, tokens, k)
                    dec = decode_all(paths, fmt)
                    row["max_abs_dlp"] = max_error(dec, scored)
                    line = (f"{k:>3} {name:<8} {row['bytes_per_entry']:>8.3f} {row['ids']:>6.3f} {row['codes']:>6.3f} "
                            f"{row['per_position']:>7.3f} {row['tail_and_sampled_per_entry']:>8.3f} "
                            f"{row['tail_and_sampled_per_token']:>8.2f} {row['file_per_token']:>7.2f} "
                            f"{row['max_abs_dlp']:>9.2e}")
                    if logits is not None:
                        loss = token_losses(logits, dec)
                        plain = plain or loss
                        row["loss"] = {m: {"mean": float(loss[m].mean()),
                                           "mean_abs_change_vs_plain": float((loss[m] - plain[m]).abs().mean()),
                                           "mean_change_vs_plain": float((loss[m] - plain[m]).mean()),
                                           "mean_abs_change_vs_exact": float((loss[m] - exact[m]).abs().mean())}
                                       for m in MODES}
                        line += "".join(f" {row['loss'][m]['mean_abs_change_vs_plain']:>13.2e} "
                                        f"{row['loss'][m]['mean_abs_change_vs_exact']:>13.2e}" for m in MODES)
                    print(line, flush=True)
                    entry.setdefault(f"k_{k}", {})[name] = row
                    if real and k == k_max:
                        decode_paths[name] = paths
            if logits is not None:
                entry["loss_mean_plain"] = {f"k_{k}": {m: entry[f"k_{k}"]["plain"]["loss"][m]["mean"] for m in MODES}
                                            for k in args.ks}
                print("mean per-token loss of π_ref on plain targets: " + "; ".join(
                    f"k = {k}: " + ", ".join(f"{m} {v:.4f}" for m, v in entry["loss_mean_plain"][f"k_{k}"].items())
                    for k in args.ks))
                del logits
        if args.run:
            timing = decode_vs_step(args.run, decode_paths, formats(k_max, sources[0].vocab))
            result["decode_vs_step"] = {"k": k_max, **timing}
            print(f"\n## decode vs distill step: {timing['batch_rows']} rows of the k = {k_max} shards, "
                  f"`{timing['loss']}`, step {timing['step_s']:.3f} s (median)")
            for name in CODECS:
                t = timing[name]
                print(f"{name:<8} read {t['read_s'] * 1e3:7.2f} ms  decode {t['decode_s'] * 1e3:7.2f} ms  "
                      f"({t['entries_per_s'] / 1e6:5.1f} M entries/s)  ratio {t['ratio']:.1e} of a step")
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
