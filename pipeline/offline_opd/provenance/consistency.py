"""Teacher consistency (docs/design.md §5): `distill` refuses inputs that would train toward the wrong optimum.

Lightning OPD's finding: offline OPD converges to the right optimum only when the teacher that wrote
the SFT data also scored the rollouts, and the rollouts were sampled by the π_ref training starts
from; otherwise a gradient bias remains that no amount of training removes. Nothing in the loss can
see this, so it is checked here, from metadata alone, before anything heavy is loaded: the
teacher_topk shard footers, π_ref's `opd_provenance.json`, and π_ref's model fingerprint (cached).

Teacher and policy mismatches can be overridden for ablations (`distill.allow_inconsistent_teacher`);
the override is logged as a warning and returned in the report that distill records. Structural
mismatches (tokenizer, k, schema version) are never overridable: the shards' token ids and top-k
layout would not mean what training assumes. A structural mismatch is reported alone, so its
message never suggests the override. π_ref's tokenizer is fingerprinted from its folder, not taken
from its provenance: a tokenizer changed after `sft` wrote the folder is a tokenizer mismatch.

Multi-teacher OPD (pipeline/offline_opd/provenance/teachers.py) holds the chain per domain: the footers'
`teachers` mapping must equal π_ref's `sft_teachers` domain by domain (a teacher mismatch, named by domain,
overridable like the single one), and every shard row must have been scored by its domain's teacher
(`check_row_teachers`: a row whose `teacher_fingerprint` is not its footer's teacher for its `domain` is a
forged or corrupted shard, never overridable). That reads two dictionary-encoded string columns per shard,
the only data (not metadata) this check reads.

The same rules run earlier where they can: `teacher_topk` checks its teacher against π_ref's SFT
teacher before scoring (`check_scoring_teacher`), and `evaluate` refuses models whose tokenizers
differ (`fingerprint.check_same_tokenizer`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc

from offline_opd.config import load_params
from offline_opd.errors import UserError
from offline_opd.contract import shards
from offline_opd.contract.tables import DOMAIN_COLUMNS, has_domains
from offline_opd.provenance.fingerprint import FIX_TOKENIZER, model_fingerprint, tokenizer_fingerprint
from offline_opd.provenance.record import PROVENANCE_FILE, ProvenanceError, check_unchanged, read_provenance

log = logging.getLogger("opd.consistency")

# Footer keys every shard of one distill run must share; the first group may be overridden for ablations.
OVERRIDABLE_KEYS = ("teacher_fingerprint", "policy_fingerprint", "scoring_temperature", "privileged_context")
STRUCTURAL_KEYS = ("schema_version", "k", "tokenizer_fingerprint")
FIX_TEACHER = ("rerun `dvc repro teacher_topk` with the SFT teacher (or `dvc repro` from sft_data with the new "
               "teacher), or set distill.allow_inconsistent_teacher: true for an ablation")
FIX_POLICY = ("rerun `dvc repro rollouts teacher_topk` so π_ref samples the rollouts, or set "
              "distill.allow_inconsistent_teacher: true for an ablation")
FIX_SCORER = ("pass the teacher that wrote π_ref's SFT data as --teacher (`dvc repro teacher_topk`), or rerun "
              "`dvc repro` from sft_data with this teacher, or set distill.allow_inconsistent_teacher: true for an "
              "ablation")


class ConsistencyError(UserError, ValueError):
    """distill's inputs come from different teachers, policies or tokenizers. The message says which and how to fix."""


@dataclass(frozen=True)
class Mismatch:
    """One failed rule, with both sides' values and where each was read from."""

    check: str
    found_what: str
    found: str
    found_from: str
    expected_what: str
    expected: str
    expected_from: str
    fix: str
    overridable: bool

    def message(self) -> str:
        return (f"{self.check} mismatch: {self.found_what} {self.found} in {self.found_from} but "
                f"{self.expected_what} {self.expected} in {self.expected_from}; fix: {self.fix}")


def check_distill_inputs(init_dir: Path | str, shards_dir: Path | str, allow_inconsistent_teacher: bool,
                         off_policy_dir: Path | str | None = None, infos: list[shards.ShardInfo] | None = None,
                         off_infos: list[shards.ShardInfo] | None = None) -> dict:
    """Check that π_ref in `init_dir` and the teacher_topk shards in `shards_dir` belong together, and so do
    the teacher's scored SFT answers in `off_policy_dir` (GKD's off-policy rows, when given).

    Raises ConsistencyError (or ShardError for an unreadable shard) naming both fingerprints and
    their files. With the override, teacher/policy mismatches only log a warning; the returned
    report (fingerprints checked, `override_used`, `mismatches`) is for distill's metadata and metrics.
    `infos` / `off_infos`: the two folders already opened (distill's data module opens them; opening checks
    every file's seal, a full read, so it is done once).
    """
    init_dir, shards_dir = Path(init_dir), Path(shards_dir)
    infos = shards.open_teacher_shards(shards_dir) if infos is None else infos
    first = infos[0]
    mismatches = _shard_disagreements(infos)
    where = f"{first.path} (footer {shards.META_PREFIX}{{key}}; {len(infos)} shards)"
    try:
        prov = read_provenance(init_dir, ("model_fingerprint", "tokenizer_fingerprint", "sft_teacher_fingerprint"))
    except ProvenanceError as exc:
        raise ConsistencyError(f"π_ref {init_dir}: {exc}") from None
    prov_path = init_dir / PROVENANCE_FILE
    sft_files = ", ".join(prov.get("sft_data_files") or []) or "unrecorded sft data files"
    init_fp, init_tok = model_fingerprint(init_dir), tokenizer_fingerprint(init_dir)
    fp = {key: first.meta[key] for key in ("teacher_fingerprint", "policy_fingerprint", "tokenizer_fingerprint")}
    recomputed = f"{init_dir} (model fingerprint, recomputed)"
    checks = [
        Mismatch("teacher", "the shards were scored by teacher", fp["teacher_fingerprint"],
                 where.format(key="teacher_fingerprint"), "π_ref was fine-tuned on answers of teacher",
                 prov["sft_teacher_fingerprint"], f"{prov_path} (sft_teacher_fingerprint, from {sft_files})",
                 FIX_TEACHER, True),
        Mismatch("policy (π_ref)", "the rollouts were sampled by policy", fp["policy_fingerprint"],
                 where.format(key="policy_fingerprint"), "distill starts from", init_fp, recomputed,
                 FIX_POLICY, True),
        Mismatch("tokenizer", "the shards were tokenized with", fp["tokenizer_fingerprint"],
                 where.format(key="tokenizer_fingerprint"), "π_ref's tokenizer is", init_tok,
                 f"{init_dir} (tokenizer fingerprint, recomputed)", FIX_TOKENIZER, False),
    ]
    domain_checks = _domain_mismatches(first, prov, prov_path, where.format(key="teachers"), FIX_TEACHER)
    if domain_checks is not None:   # per domain instead of the set fingerprint: the message names the domain
        checks = [m for m in checks if m.check != "teacher"] + domain_checks
    mismatches += [m for m in checks if m.found != m.expected]
    mismatches += check_row_teachers(infos)
    if first.meta.get("source") == "sft_data":
        mismatches.append(Mismatch("shards' source", "the shards hold the teacher's own answers (source sft_data)",
                                   "sft_data", where.format(key="source"), "--shards takes", "π_ref's rollouts",
                                   "the teacher_topk stage", "pass data/teacher_topk as --shards and the "
                                   "sft_topk folder as --off-policy", False))
    off = None
    if off_policy_dir is not None:
        off = shards.open_teacher_shards(off_policy_dir) if off_infos is None else off_infos
        mismatches += _off_policy_mismatches(infos, off, prov["sft_teacher_fingerprint"],
                                             f"{prov_path} (sft_teacher_fingerprint, from {sft_files})")
    _raise_or_warn([m for m in mismatches if not m.overridable], allow_inconsistent_teacher)  # structural first
    check_unchanged(init_dir)  # then, never overridable either: an edited π_ref is not the model anything recorded
    _raise_or_warn(mismatches, allow_inconsistent_teacher)
    return {
        "teacher_fingerprint": fp["teacher_fingerprint"],
        "sft_teacher_fingerprint": prov["sft_teacher_fingerprint"],
        "policy_fingerprint": fp["policy_fingerprint"],
        "init_fingerprint": init_fp,
        "tokenizer_fingerprint": fp["tokenizer_fingerprint"],
        "init_tokenizer_fingerprint": init_tok,
        "k": json.loads(first.meta["k"]),
        "schema_version": first.meta["schema_version"],
        "num_shards": len(infos),
        "num_rows": sum(i.num_rows for i in infos),
        "allow_inconsistent_teacher": allow_inconsistent_teacher,
        "override_used": bool(mismatches),
        "mismatches": [asdict(m) for m in mismatches],
        **({"teachers": json.loads(first.meta["teachers"])} if has_domains(first.meta) else {}),
        **({"sft_teachers": prov["sft_teachers"]} if prov.get("sft_teachers") else {}),
        **({} if off is None else {"off_policy_teacher_fingerprint": off[0].meta["teacher_fingerprint"],
                                   "off_policy_num_shards": len(off), "off_policy_num_rows": sum(i.num_rows for i in off)}),
    }


def _domain_mismatches(first: shards.ShardInfo, prov: dict, prov_path: Path, where: str,
                       fix: str) -> list[Mismatch] | None:
    """Per-domain teacher checks when the shards and π_ref both record domain teachers; None otherwise."""
    scored, sft = json.loads(first.meta["teachers"]) if has_domains(first.meta) else None, prov.get("sft_teachers")
    if scored is None and sft is None:
        return None
    scored, sft = scored or {}, sft or {}
    return [Mismatch(f"teacher of domain {d!r}", "the shards were scored by teacher", scored.get(d, "(none)"), where,
                     "π_ref was fine-tuned on answers of teacher", sft.get(d, "(none)"),
                     f"{prov_path} (sft_teachers)", fix, True)
            for d in sorted(set(scored) | set(sft))]


def check_row_teachers(infos: list[shards.ShardInfo]) -> list[Mismatch]:
    """Every row of a multi-teacher shard was scored by its domain's teacher, as the shard's footer maps them.

    Returns at most one (structural) Mismatch, naming the file, the row and its domain. Vectorised: the distinct
    (domain, teacher) pairs of each row group are compared, and only a bad pair is located row by row.
    """
    for info in infos:
        if not has_domains(info.meta):
            continue
        teachers, row = json.loads(info.meta["teachers"]), 0
        for group in shards.iter_row_groups(info, ["sample_id", *DOMAIN_COLUMNS]):
            domain, teacher = (group.column(c).combine_chunks() for c in DOMAIN_COLUMNS)
            pairs = pc.binary_join_element_wise(domain, teacher, "\x00")
            bad = [p for p in pc.unique(pairs).to_pylist() if teachers.get(p.split("\x00")[0]) != p.split("\x00")[1]]
            if bad:
                i = pairs.to_pylist().index(bad[0])
                d, fp = bad[0].split("\x00")
                return [Mismatch(
                    f"row teacher (domain {d!r})", f"row {row + i} (sample_id {group.column('sample_id')[i].as_py()!r}) "
                    f"was scored by teacher", fp, f"{info.path} (column teacher_fingerprint)",
                    f"domain {d!r}'s teacher is" if d in teachers else f"no teacher is recorded for domain {d!r}:",
                    teachers.get(d, "(none)"), f"{info.path} (footer {shards.META_PREFIX}teachers)",
                    f"the shard was not written by `teacher_topk` as recorded: delete {info.path.parent} and rerun "
                    f"`dvc repro teacher_topk`", False)]
            row += group.num_rows
    return []


def _off_policy_mismatches(on: list[shards.ShardInfo], off: list[shards.ShardInfo], sft_teacher: str,
                           sft_teacher_from: str) -> list[Mismatch]:
    """GKD's off-policy shards (`sft_topk`) against the rollouts' shards they are batched with: the teacher's own
    answers, in the same format, scored the same way by the same teacher, the one that wrote them and π_ref's
    SFT data. Format keys are structural (one batch holds one [B, T, W] tensor); the rest overridable."""
    first, on0 = off[0], on[0]
    mismatches = _shard_disagreements(off)
    at = f"{first.path} (footer {shards.META_PREFIX}{{key}}; {len(off)} off-policy shards)"
    on_at = f"{on0.path} (footer {shards.META_PREFIX}{{key}}; the rollouts' shards)"
    if first.meta.get("source") != "sft_data":
        return mismatches + [Mismatch(
            "off-policy source", "the off-policy shards hold rows of", first.meta.get("source") or "rollouts",
            at.format(key="source"), "GKD's off-policy rows are", "sft_data", "the teacher's own answers",
            "pass the folder `sft_topk` writes (--off-policy data/sft_topk)", False)]
    fix_format = "rerun `dvc repro sft_topk` (it scores with teacher_topk's settings, as the rollouts were)"
    for key in ("schema_version", "k", "tokenizer_fingerprint", "codec", "width", "samples", "selection",
                "logprob_dtype"):
        if first.meta.get(key) != on0.meta.get(key):
            mismatches.append(Mismatch(f"off-policy {key}", "the off-policy shards have", str(first.meta.get(key)),
                                       at.format(key=key), "the rollouts' shards", str(on0.meta.get(key)),
                                       on_at.format(key=key), fix_format, False))
    fix_teacher = ("rerun `dvc repro sft_topk` with the teacher that scored the rollouts and wrote π_ref's SFT data, "
                   "or set distill.allow_inconsistent_teacher: true for an ablation")
    teacher = first.meta["teacher_fingerprint"]
    checks = [
        Mismatch("off-policy teacher", "the off-policy shards were scored by teacher", teacher,
                 at.format(key="teacher_fingerprint"), "π_ref was fine-tuned on answers of teacher", sft_teacher,
                 sft_teacher_from, fix_teacher, True),
        Mismatch("off-policy writer", "the off-policy rows were written by", first.meta["policy_fingerprint"],
                 at.format(key="policy_fingerprint"), "they were scored by teacher", teacher,
                 at.format(key="teacher_fingerprint"), fix_teacher, True),
    ]
    if on0.meta["teacher_fingerprint"] != sft_teacher:   # else the first check covers it
        checks.append(Mismatch("off-policy teacher", "the off-policy shards were scored by teacher", teacher,
                               at.format(key="teacher_fingerprint"), "the rollouts by teacher",
                               on0.meta["teacher_fingerprint"], on_at.format(key="teacher_fingerprint"),
                               fix_teacher, True))
    for key in ("scoring_temperature", "privileged_context"):
        checks.append(Mismatch(f"off-policy {key}", "the off-policy shards have", first.meta[key], at.format(key=key),
                               "the rollouts' shards", on0.meta[key], on_at.format(key=key), fix_teacher, True))
    return mismatches + [m for m in checks if m.found != m.expected]


def check_sft_scorer(teacher: Path, teacher_fp: str, sft: shards.ShardInfo, allow_inconsistent_teacher: bool) -> None:
    """sft_topk's half of the chain, before anything is scored: `teacher` must be the teacher that wrote the
    SFT answers it scores (GKD's off-policy rows are the teacher's own sequences)."""
    found = Mismatch("teacher", "the scoring teacher is", teacher_fp, f"{teacher} (model fingerprint)",
                     "the SFT answers were written by teacher", sft.meta["teacher_fingerprint"],
                     f"{sft.path} (footer {shards.META_PREFIX}teacher_fingerprint)",
                     "pass the teacher that wrote data/sft as --teacher (`dvc repro sft_topk`), or rerun `dvc repro` "
                     "from sft_data with this teacher, or set distill.allow_inconsistent_teacher: true for an "
                     "ablation", True)
    _raise_or_warn([found] if found.found != found.expected else [], allow_inconsistent_teacher)


def _shard_disagreements(infos: list[shards.ShardInfo]) -> list[Mismatch]:
    """Every shard must match the first one on the keys that define what a run trains on."""
    first, out = infos[0], []
    for key in STRUCTURAL_KEYS + OVERRIDABLE_KEYS:
        other = next((i for i in infos[1:] if i.meta[key] != first.meta[key]), None)
        if other is not None:
            out.append(Mismatch(
                f"shards' {key}", "one shard has", other.meta[key], f"{other.path} (footer {shards.META_PREFIX}{key})",
                "another has", first.meta[key], f"{first.path} (footer {shards.META_PREFIX}{key})",
                f"shards from different runs are mixed in {other.path.parent}: delete them and rerun "
                f"`dvc repro teacher_topk`" if key in STRUCTURAL_KEYS else FIX_TEACHER, key in OVERRIDABLE_KEYS))
    return out


def check_scoring_teacher(teacher: Path, teacher_fp: str, rollouts: shards.ShardInfo,
                          allow_inconsistent_teacher: bool, domain_fps: dict[str, str] | None = None) -> None:
    """teacher_topk's half of the chain, before anything is scored: `teacher` must be the teacher whose
    answers π_ref (the policy the rollouts name) was fine-tuned on. distill checks the same from the
    shards, but only after the most expensive stage ran. A policy without provenance cannot be checked
    here (distill refuses it); that is logged, not refused, so a bare policy folder can still be scored.
    """
    policy = Path(rollouts.meta["policy_path"])
    try:
        prov = read_provenance(policy, ("sft_teacher_fingerprint",))
    except ProvenanceError as exc:
        log.warning("teacher chain not checked before scoring (π_ref %s: %s); distill checks it", policy, exc)
        return
    found = [Mismatch("teacher", "the scoring teacher is", teacher_fp, f"{teacher} (model fingerprint)",
                      "π_ref was fine-tuned on answers of teacher", prov["sft_teacher_fingerprint"],
                      f"{policy / PROVENANCE_FILE} (sft_teacher_fingerprint; π_ref sampled {rollouts.path.parent})",
                      FIX_SCORER, True)]
    sft = prov.get("sft_teachers")
    if domain_fps or sft:   # multi-teacher: domain by domain, so the message names the domain
        found = [Mismatch(f"teacher of domain {d!r}", "the scoring teacher is", (domain_fps or {}).get(d, "(none)"),
                          f"{teacher} (routing and model fingerprints)", "π_ref was fine-tuned on answers of teacher",
                          (sft or {}).get(d, "(none)"), f"{policy / PROVENANCE_FILE} (sft_teachers)", FIX_SCORER, True)
                 for d in sorted(set(domain_fps or {}) | set(sft or {}))]
    _raise_or_warn([m for m in found if m.found != m.expected], allow_inconsistent_teacher)


def check_scoring_tokenizer(teacher: Path, teacher_tok: str, rollouts: shards.ShardInfo) -> None:
    """Teacher and π_ref must read token ids identically (docs/design.md §3), or every score is of the wrong token."""
    policy_tok = rollouts.meta["tokenizer_fingerprint"]
    if teacher_tok != policy_tok:
        raise UserError(
            f"tokenizer mismatch: teacher {teacher} has tokenizer fingerprint {teacher_tok}, but the rollouts "
            f"in {rollouts.path} were tokenized with {policy_tok} (policy {rollouts.meta.get('policy_path')}); "
            f"teacher and student must share one tokenizer: use a teacher with the student's tokenizer, or "
            f"rebuild the student from the teacher's")


def check_sft_teacher(teacher: Path, teacher_fp: str, data: Path, footer) -> None:
    """sft's half of the chain: the SFT parts in `data` (their footer, `footers.SftDataFooter`) must have been
    written by `teacher`, the model that sft records as π_ref's SFT teacher."""
    if teacher_fp != footer.teacher_fingerprint:
        raise ConsistencyError(
            f"teacher mismatch: {data} was written by teacher {footer.teacher_fingerprint} "
            f"({footer.teacher_path or '?'}) but --teacher {teacher} is {teacher_fp}; "
            f"rerun `dvc repro sft_data` with this teacher")


def check_student_tokenizer(source: str, base: Path, data_tokenizer_fp: str, data: Path) -> None:
    """A real student base (`sft.source`, resolved to `base`) must tokenize exactly like the teacher that
    wrote the SFT data in `data`, or the teacher's top-k ids would name other tokens in its vocabulary."""
    base_fp = tokenizer_fingerprint(base)
    if base_fp != data_tokenizer_fp:
        raise ConsistencyError(
            f"tokenizer mismatch: student base {source} has tokenizer {base_fp} but the SFT data in {data} "
            f"was tokenized by the teacher's tokenizer {data_tokenizer_fp}; fix: {FIX_TOKENIZER} "
            f"(pick a student base from the teacher's model family)")


def override_allowed(params: Path) -> bool:
    """`distill.allow_inconsistent_teacher`, the one switch for a teacher ablation, read by teacher_topk too so
    that the ablation's shards can be scored. Not a param of that stage: it decides only whether the stage
    refuses, never what it writes (and a refusal leaves no output for DVC to cache)."""
    distill = load_params(params, required=()).get("distill")
    return distill is not None and distill.allow_inconsistent_teacher


def _raise_or_warn(mismatches: list[Mismatch], allow: bool) -> None:
    structural = [m for m in mismatches if not m.overridable]
    hard = structural or [m for m in mismatches if not allow]
    if hard:
        raise ConsistencyError(" | ".join(m.message() for m in hard))
    for m in mismatches:
        log.warning("distill.allow_inconsistent_teacher is set: training anyway despite %s", m.message())
