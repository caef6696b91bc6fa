"""`opd-inspect`: explain logit shards with DuckDB SQL (what they hold, who wrote them, what they teach).

Every view and query is plain DuckDB SQL kept as a named string in this module, so the README shows them
verbatim and users can run them in the `duckdb` CLI or build their own. `--shards` names a shard folder
(default data/teacher_topk) or a glob; every folder it touches first passes the shard-folder check that
distill applies (offline_opd.contract.shards.check_folder: each part's sealed checksum, footer and schema,
one complete run, no row twice, no stray `.parquet`), and the views then read exactly the checked parts,
listed by name (never a glob, which would also read a stray or copied file). Views:
`shard_rows` (the rows as stored, plus `filename`), `shards` (the same rows decoded: `topk_ids` as
integers with -1 for an empty slot, `topk_logprobs` as log-probs, whatever the codec; `tail_logprob`
NULL for shards written before it existed), `shard_meta` (the `opd.*` footer key/values via
`parquet_kv_metadata`) and `shard_files` (file sizes via `read_blob`, which does not read contents).
`tokens` (one row per response token) is a view over `shards`; `mix` (multi-teacher OPD) counts rows and
response tokens per domain and teacher. The decoding SQL is generated from the
codec the footer records (`Codec.sql_columns` in pipeline/offline_opd/contract/codec.py, next to the numpy
decoder it must equal; tests/test_inspect.py checks them against each other on the same shards).
`check DIR` and `verify` are not SQL: `check` runs the shard contract's run check
(offline_opd.contract.shards.check_folder), the one distill applies before training; `verify` checks each
file's sealed checksum and reads every page, naming every corrupt file. Output piped into a reader that
stops early (`| head -1`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import glob as globlib
import sys
from pathlib import Path
from typing import Any, Sequence

import duckdb

from offline_opd.errors import UserError
from offline_opd.contract import shards as shard_contract
from offline_opd.contract.tables import view_sql
from offline_opd.models.loading import ModelPathError
from offline_opd.runtime import closed_pipe_is_quiet

DEFAULT_SHARDS = "data/teacher_topk"
DEFAULT_TOKENIZER = "data/models/teacher"

# {files} (the checked parts, a DuckDB list of file names) and {decode} (the select list of `shards`, from
# `tables.view_sql`: the columns under today's names, the entries decoded by the footer's codec) are the
# placeholders; the rest is what you would type into `duckdb`.
VIEWS_SQL = """
CREATE OR REPLACE VIEW shard_rows AS
  SELECT * FROM read_parquet({files}, filename = true);
CREATE OR REPLACE VIEW shards AS
  SELECT {decode}
  FROM shard_rows;
CREATE OR REPLACE VIEW shard_meta AS
  SELECT file_name AS filename, substr(decode(key), 5) AS key, decode(value) AS value
  FROM parquet_kv_metadata({files})
  WHERE starts_with(decode(key), 'opd.');
CREATE OR REPLACE VIEW shard_files AS
  SELECT filename, size FROM read_blob({files});
"""

# One row per response token. Position t (1-based) of a response is input_ids[prompt_len + t]; its
# top-k block is topk_ids[(t-1)*k + 1 : t*k] (DuckDB slices are 1-based, both ends inclusive).
# Teacher entropy is over the k+1 outcomes top-k + tail bucket (the distribution the losses use):
# a lower bound on the full-vocabulary entropy, equal to it when the tail mass is zero. The tail is the
# stored exact one, or (version 1 shards) rebuilt as 1 - sum(top_p). With k = 0 (shards for the `pg`
# loss) the top-k columns, entropy and argmax agreement are NULL. `k` here is the entries per position
# (more than the footer's k with union or sampled entries). The teacher's argmax is the stored entry
# with the largest log-prob (entries are in descending order except with codec `compact`, which keeps
# them in id order; it is the argmax itself unless the selection is `sampled`).
TOKENS_VIEW_SQL = """
CREATE OR REPLACE VIEW tokens AS
WITH rows AS (
  SELECT filename, sample_id, input_ids, prompt_len, behavior_logprob, teacher_logprob, tail_logprob,
         topk_ids, topk_logprobs, len(topk_ids) // greatest(len(teacher_logprob), 1) AS k
  FROM shards
), positions AS (
  SELECT *, unnest(range(1, len(teacher_logprob) + 1)) AS t FROM rows
), blocks AS (
  SELECT filename, sample_id, input_ids, prompt_len, k, t,
         input_ids[prompt_len + t] AS token_id,
         teacher_logprob[t] AS teacher_lp,
         tail_logprob[t] AS tail_lp,
         behavior_logprob[t] AS student_lp,
         topk_ids[(t - 1) * k + 1 : t * k] AS top_ids,
         list_transform(topk_logprobs[(t - 1) * k + 1 : t * k], lambda x: exp(x)) AS top_p
  FROM positions
), tails AS (
  SELECT *, CASE WHEN k > 0 THEN coalesce(exp(tail_lp), greatest(1 - list_sum(top_p), 0)) END AS tail_p
  FROM blocks
)
SELECT filename, sample_id, input_ids, prompt_len, k, t, token_id, teacher_lp, student_lp,
       teacher_lp - student_lp AS gap,
       top_ids, top_p, tail_p,
       top_ids[list_position(top_p, list_max(top_p))] AS teacher_argmax,
       token_id = top_ids[list_position(top_p, list_max(top_p))] AS sampled_is_teacher_argmax,
       -list_sum(list_transform(top_p, lambda p: CASE WHEN p > 0 THEN p * ln(p) ELSE 0 END))
         - CASE WHEN tail_p > 0 THEN tail_p * ln(tail_p) ELSE 0 END AS teacher_entropy
FROM tails;
"""

SUMMARY_SQL = """
WITH data AS (
  SELECT filename, count(*) AS rows, sum(len(input_ids) - prompt_len) AS response_tokens
  FROM shards GROUP BY filename
), meta AS (
  SELECT filename,
         any_value(value) FILTER (WHERE key = 'k') AS k,
         any_value(value) FILTER (WHERE key = 'teacher_fingerprint') AS teacher_fingerprint
  FROM shard_meta GROUP BY filename
)
SELECT coalesce(parse_filename(data.filename), 'total') AS shard,
       sum(rows) AS rows, sum(response_tokens) AS response_tokens,
       string_agg(DISTINCT k, ',') AS k,
       string_agg(DISTINCT teacher_fingerprint, ',') AS teacher_fingerprint,
       sum(size) AS file_bytes,
       round(sum(size) / sum(response_tokens), 2) AS bytes_per_token
FROM data JOIN meta USING (filename) JOIN shard_files USING (filename)
GROUP BY GROUPING SETS ((data.filename), ())
ORDER BY data.filename NULLS LAST;
"""

# Keys every shard shares are shown once ("all N"); keys that differ are listed per shard.
META_SQL = """
SELECT key, value,
       CASE WHEN count(*) = (SELECT count(DISTINCT filename) FROM shard_meta)
            THEN 'all ' || count(*)
            ELSE string_agg(parse_filename(filename), ' ' ORDER BY filename) END AS shards
FROM shard_meta
GROUP BY key, value
ORDER BY key, shards;
"""

TOKENS_SUMMARY_SQL = """
SELECT coalesce(parse_filename(filename), 'total') AS shard,
       count(*) AS tokens,
       round(avg(teacher_entropy), 4) AS teacher_entropy,
       round(avg(tail_p), 4) AS tail_p,
       round(avg(sampled_is_teacher_argmax::DOUBLE), 4) AS argmax_agree,
       round(avg(teacher_lp), 4) AS teacher_lp,
       round(avg(student_lp), 4) AS student_lp,
       round(avg(student_lp - teacher_lp), 4) AS rkl_estimate
FROM tokens
GROUP BY GROUPING SETS ((filename), ())
ORDER BY filename NULLS LAST;
"""

# The largest |log p_teacher - log p_student| of sampled tokens, with the ids before them as context.
TOP_GAPS_SQL = """
-- first: SET VARIABLE top = 10; SET VARIABLE context = 24;
SELECT sample_id, t, token_id, round(teacher_lp, 3) AS teacher_lp, round(student_lp, 3) AS student_lp,
       round(gap, 3) AS gap, teacher_argmax,
       input_ids[greatest(prompt_len + t - getvariable('context'), 1) : prompt_len + t - 1] AS context_ids
FROM tokens
ORDER BY abs(gap) DESC, sample_id, t
LIMIT getvariable('top');
"""

# Multi-teacher OPD: the mix of a run, rows and response tokens per domain and the teacher that scored (or, for
# sft_data, wrote) them, from the per-row columns (contract/tables.py DOMAIN_FIELDS). `mix_rows` is that view;
# for single-teacher shards it holds one domain, `all`, and the footer's teacher.
MIX_VIEW_SQL = """
CREATE OR REPLACE VIEW mix_rows AS
  SELECT domain, teacher_fingerprint, len(input_ids) - prompt_len AS response_tokens FROM shards;
"""
MIX_ONE_TEACHER_VIEW_SQL = """
CREATE OR REPLACE VIEW mix_rows AS
  SELECT 'all' AS domain, m.value AS teacher_fingerprint, len(s.input_ids) - s.prompt_len AS response_tokens
  FROM shards s LEFT JOIN shard_meta m ON m.filename = s.filename AND m.key = 'teacher_fingerprint';
"""
MIX_SQL = """
SELECT coalesce(domain, 'total') AS domain, coalesce(teacher_fingerprint, '') AS teacher,
       count(*) AS rows, sum(response_tokens) AS response_tokens,
       round(100.0 * count(*) / (SELECT count(*) FROM mix_rows), 1) AS pct_rows,
       round(100.0 * sum(response_tokens) / (SELECT sum(response_tokens) FROM mix_rows), 1) AS pct_tokens
FROM mix_rows
GROUP BY GROUPING SETS ((domain, teacher_fingerprint), ())
ORDER BY domain IS NULL, domain, teacher_fingerprint;
"""

QUERIES = {"views": VIEWS_SQL, "tokens_view": TOKENS_VIEW_SQL, "summary": SUMMARY_SQL, "meta": META_SQL,
           "tokens": TOKENS_SUMMARY_SQL, "top_gaps": TOP_GAPS_SQL, "mix_view": MIX_VIEW_SQL, "mix": MIX_SQL}


class InspectError(UserError, ValueError):
    """No shards match, or one is unreadable; the message names the glob or file."""


def shard_files(spec: str) -> list[Path]:
    """The parts `--shards` names, after the shard-folder check of every folder they are in.

    A folder: all its parts. A glob: the parts it matches (a subset of a run is fine to inspect), each
    folder it touches checked whole; a matched file that is not one of the checked parts is refused.
    """
    path = Path(spec)
    if path.is_dir():
        return [info.path for info in shard_contract.check_folder(path)]
    matched = sorted(Path(p) for p in globlib.glob(spec))
    if not matched:
        raise InspectError(f"no shards match {spec!r}: run `dvc repro teacher_topk`, or pass --shards FOLDER")
    checked: set[Path] = set()
    for folder in dict.fromkeys(p.parent for p in matched):
        checked.update(info.path.resolve() for info in shard_contract.check_folder(folder))
    outside = [p for p in matched if p.resolve() not in checked]
    if outside:
        raise InspectError(f"{outside[0]}: matched by {spec!r} but not a part of the checked shard run in "
                           f"{outside[0].parent}; pass the folder itself with --shards")
    return matched


def connect(spec: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the shard views defined over the checked parts `spec` names (`shard_files`)."""
    con = duckdb.connect()
    con.execute(views_sql(shard_files(spec)))
    return con


def views_sql(files: Sequence[Path]) -> str:
    """VIEWS_SQL over exactly `files`, decoding them as their footers say (as stored if none)."""
    decodes = {}
    for path in files:
        meta = shard_contract.read_meta(path)  # names a truncated or corrupt file instead of a DuckDB stack
        decodes.setdefault(decode_sql(Path(path), meta), path)
    if len(decodes) > 1:
        a, b = list(decodes.values())[:2]
        raise InspectError(f"{a} and {b} store their entries differently (codec or schema version); "
                           f"inspect one run at a time with --shards")
    decode = next(iter(decodes), "*")
    listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files)
    return VIEWS_SQL.format(files=f"[{listed}]", decode=decode)


def decode_sql(path: Path, meta: dict[str, str]) -> str:
    """The select list of the `shards` view that decodes this shard (from its footer)."""
    kind, version = meta.get("kind"), meta.get("schema_version", "")
    fmt = shard_contract.shard_format(path, meta) if kind == "teacher_topk" else None
    return view_sql(kind, version, fmt)


def query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple]]:
    rel = con.execute(sql)
    return [d[0] for d in rel.description], rel.fetchall()


def frame(spec: str, sql: str = "SELECT * FROM shards") -> Any:
    """`sql` over the checked, decoded views of the shards `spec` names, as a polars DataFrame.

    The notebook entry point (`frame("data/teacher_topk")`): the same checks and decoding as the CLI, then the
    analysis in polars, which DuckDB hands the result to through Arrow without a copy per row.
    """
    return connect(spec).sql(sql).pl()


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain text: numbers right-aligned, everything else left-aligned."""
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in text)])


def top_gaps(con: duckdb.DuckDBPyConnection, top: int, context: int, tokenizer_dir: Path) -> str:
    """The tokens where teacher and student disagree most, decoded as `context⟦token⟧`."""
    from offline_opd.models.loading import load_tokenizer
    from offline_opd.provenance.teachers import load_teachers

    tok = load_tokenizer(load_teachers(tokenizer_dir).first)   # a multi-teacher folder: the shared tokenizer
    con.execute(f"SET VARIABLE top = {int(top)}; SET VARIABLE context = {int(context)};")
    columns, rows = query(con, TOP_GAPS_SQL)
    shown = [c for c in columns if c != "context_ids"]
    out = []
    for row in rows:
        rec = dict(zip(columns, row))
        out.append((*(rec[c] for c in shown), decode_in_context(tok, rec["context_ids"], rec["token_id"])))
    return format_table([*shown, "text"], out)


def decode_in_context(tok: Any, context_ids: list[int], token_id: int) -> str:
    """Decode the token as it reads after its context (a lone SentencePiece/BPE token can lose its space)."""
    before = tok.decode(context_ids)
    full = tok.decode([*context_ids, token_id])
    piece = full[len(before):] if full.startswith(before) else tok.decode([token_id])
    return repr(f"{before}⟦{piece}⟧")[1:-1]


def verify(spec: str) -> str:
    """Every matching shard's sealed checksum checked and every page read and CRC-checked: a line per
    shard, or one error naming each corrupt file (and row group)."""
    folder = Path(spec)
    files = shard_contract.list_parts(folder) if folder.is_dir() else sorted(Path(p) for p in globlib.glob(spec))
    if not files:
        raise InspectError(f"no shards match {spec!r}: run `dvc repro teacher_topk`, or pass --shards FOLDER")
    rows, bad = [], []
    for path in files:
        try:
            groups = shard_contract.verify_pages(path)   # first: a bad page is named with its row group
            shard_contract.check_integrity(path)          # then the seal, which also covers the footer
            rows.append((path.name, groups, "ok"))
        except shard_contract.ShardError as exc:
            bad.append(str(exc))
    if bad:
        raise InspectError(" | ".join(bad))
    return format_table(["shard", "row_groups", "pages"], rows)


def check(folder: Path) -> str:
    infos = shard_contract.check_folder(folder)
    return (f"{folder}: ok, {len(infos)} parts of one {infos[0].meta['kind']} run "
            f"({sum(i.num_rows for i in infos)} rows, run key {infos[0].meta.get('run_key', '?')[:12]})")


def run(args: argparse.Namespace) -> str:
    if args.command == "check":
        return check(args.dir)
    if args.command == "verify":
        return verify(args.shards)
    con = connect(args.shards)
    if args.command == "summary":
        return format_table(*query(con, SUMMARY_SQL))
    if args.command == "meta":
        return format_table(*query(con, META_SQL))
    if args.command == "mix":
        columns = {row[0] for row in con.execute("DESCRIBE shards").fetchall()}
        con.execute(MIX_VIEW_SQL if "teacher_fingerprint" in columns else MIX_ONE_TEACHER_VIEW_SQL)
        return format_table(*query(con, MIX_SQL))
    if args.command == "sql":
        columns = {row[0] for row in con.execute("DESCRIBE shards").fetchall()}
        if {"teacher_logprob", "topk_ids", "topk_logprobs"} <= columns:  # rollout shards have no `tokens` view
            con.execute(TOKENS_VIEW_SQL)
        return format_table(*query(con, args.query))
    con.execute(TOKENS_VIEW_SQL)
    report = format_table(*query(con, TOKENS_SUMMARY_SQL))
    if args.top > 0:
        report += "\n\nlargest teacher-student gaps (gap = log p_teacher - log p_student of the sampled token):\n"
        report += top_gaps(con, args.top, args.context, args.tokenizer)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-inspect", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + "\nRun `opd-inspect queries` to print the SQL and use it in plain DuckDB.")
    parser.add_argument("--shards", default=DEFAULT_SHARDS,
                        help=f"a shard folder, or a glob of parts in one (default {DEFAULT_SHARDS}); every folder "
                             f"is checked first, as distill checks it")
    # Also accepted after the subcommand (`opd-inspect summary --shards ...`), where users tend to put it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shards", default=argparse.SUPPRESS, help="a shard folder, or a glob of parts")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("summary", parents=[common],
                   help="per shard: rows, response tokens, k, teacher fingerprint, file bytes, bytes/token")
    sub.add_parser("mix", parents=[common],
                   help="multi-teacher OPD: rows and response tokens per domain and the teacher that scored them "
                        "(one domain, 'all', for single-teacher shards)")
    sub.add_parser("meta", parents=[common],
                   help="every opd.* footer key/value (once when all shards agree, else per shard)")
    tokens = sub.add_parser("tokens", parents=[common],
                            help="token-level view: teacher entropy (top-k + tail), argmax agreement, "
                                 "log-probs, and the largest teacher-student gaps decoded to text")
    tokens.add_argument("--top", type=int, default=10, help="how many largest-gap tokens to decode (0: none)")
    tokens.add_argument("--context", type=int, default=24, help="tokens of context shown before each one")
    tokens.add_argument("--tokenizer", type=Path, default=Path(DEFAULT_TOKENIZER),
                        help=f"model folder whose tokenizer decodes the ids (default {DEFAULT_TOKENIZER})")
    sql = sub.add_parser("sql", parents=[common],
                         help="run any DuckDB query; views shards, shard_meta, shard_files, tokens exist")
    sql.add_argument("query", help='e.g. "select count(*) from tokens where sampled_is_teacher_argmax"')
    sub.add_parser("verify", parents=[common],
                   help="check every shard's sealed checksum and read every page, checking its CRC, naming each "
                        "corrupt file (distill checks the same before training)")
    queries = sub.add_parser("queries", parents=[common],
                             help="check the shard folder, then print the SQL of the views and queries over its "
                                  "parts, listed by name, to run in plain DuckDB")
    queries.add_argument("names", nargs="*", metavar="NAME", help=f"only these ({', '.join(QUERIES)}; default all)")
    check = sub.add_parser("check", help="are the parts in DIR one complete run: every part present, one run "
                                         "key, no row twice (what distill enforces)? Exit 2 naming the problem if not")
    check.add_argument("dir", type=Path, help="a shard folder (data/rollouts, data/teacher_topk or data/sft)")
    return parser


def queries_text(spec: str, names: Sequence[str]) -> str:
    """The SQL `opd-inspect queries` prints: the views over the checked parts, then the queries."""
    views = views_sql(shard_files(spec)) if not names or "views" in names else ""
    return "\n".join(f"-- {name}\n{views if name == 'views' else sql}".rstrip() + "\n"
                     for name, sql in QUERIES.items() if not names or name in names)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(getattr(args, "names", [])) - set(QUERIES))
    if unknown:
        parser.error(f"queries: unknown name {unknown[0]!r}; choose from {', '.join(QUERIES)}")
    with closed_pipe_is_quiet():
        try:
            print(queries_text(args.shards, args.names) if args.command == "queries" else run(args))
        except (InspectError, shard_contract.ShardError, ModelPathError, duckdb.Error) as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
