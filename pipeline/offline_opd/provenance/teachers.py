"""Multi-teacher OPD: which teacher answers and scores each prompt domain (docs/design.md §12).

The `teacher` stage has one output, data/models/teacher. With one teacher (`teacher.domains: {}`, every preset
but the multi-teacher toy) it is that teacher's model folder, exactly as before. With domains it holds one model
folder per domain with a teacher of its own (`<root>/<domain>/`, each with its opd_provenance.json recording
its domain) and ROUTES_FILE, the routing {prompt domain: teacher folder name}. Every stage that takes
--teacher reads it through `load_teachers`, so the routing is read from the artefact DVC tracks, never from
params a stage does not declare.

Why one folder with sub-folders and not a DVC `foreach` stage per domain: the DAG keeps its shape and stage
names for every preset (dvc.lock, `dvc repro teacher_topk`, the rounds generator and tests/test_dag.py all name
`teacher`), and the downstream stages depend on one path whatever the number of domains; the price is that
editing one domain's teacher retrains all of them (DVC's unit is the stage).

The set of domain teachers has one fingerprint, `set_fingerprint` of {domain: model fingerprint}: it is
what the footers' `teacher_fingerprint` and π_ref's `sft_teacher_fingerprint` hold under multi-teacher
OPD, so the single-teacher consistency chain applies unchanged to the set, and the per-domain mapping
(footer `teachers`, provenance `sft_teachers`) says which domain broke it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Optional

from offline_opd.atomic import write_json
from offline_opd.contract.prompts import prompt_domains, read_prompts
from offline_opd.errors import UserError
from offline_opd.provenance.fingerprint import check_same_tokenizer, model_fingerprint, tokenizer_fingerprint
from offline_opd.provenance.record import PROVENANCE_FILE, check_unchanged

ROUTES_FILE = "opd_teachers.json"
FIX_ROUTES = "rerun `dvc repro teacher` (or `dvc checkout data/models/teacher`)"


class TeacherRoutingError(UserError, ValueError):
    """The prompts' domains and the teachers do not match. The message names the domain, the file and the fix."""


def set_fingerprint(fingerprints: dict[str, str]) -> str:
    """One fingerprint for a domain -> teacher fingerprint mapping (equal iff every domain has the same teacher)."""
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]


def write_routes(root: Path, routes: dict[str, str]) -> None:
    write_json(root / ROUTES_FILE, {"routes": dict(sorted(routes.items()))})


@dataclass(frozen=True)
class Teachers:
    """The teacher(s) behind a --teacher folder: one model folder, or one per domain and their routing."""

    root: Path
    routes: Optional[dict[str, str]]   # prompt domain -> sub-folder; None: `root` is the one teacher

    @property
    def multi(self) -> bool:
        return self.routes is not None

    def folder(self, domain: str | None) -> Path:
        """The model folder of the teacher of `domain` (the one teacher when there are no domains)."""
        return self.root if self.routes is None else self.root / self.routes[domain]

    def folders(self) -> dict[str, Path]:
        """Each distinct model folder, by name (the folder's own name; '' for the one teacher)."""
        if self.routes is None:
            return {"": self.root}
        return {name: self.root / name for name in sorted(set(self.routes.values()))}

    @property
    def first(self) -> Path:
        """A model folder for what all teachers share (tokenizer, vocabulary)."""
        return next(iter(self.folders().values()))

    @cached_property
    def fingerprints(self) -> dict[str, str]:
        """Domain -> model fingerprint of its teacher ({} for the one teacher)."""
        by_folder = {name: model_fingerprint(path) for name, path in self.folders().items()}
        return {} if self.routes is None else {d: by_folder[name] for d, name in sorted(self.routes.items())}

    @property
    def fingerprint(self) -> str:
        """The teacher's model fingerprint, or the set fingerprint of the domain teachers."""
        return model_fingerprint(self.root) if self.routes is None else set_fingerprint(self.fingerprints)

    def tokenizer_fingerprint(self) -> str:
        """The tokenizer every teacher shares; refuses teachers that tokenize differently, naming both."""
        if self.routes is None:
            return tokenizer_fingerprint(self.root)
        return check_same_tokenizer({f"teacher of domain {name}": path for name, path in self.folders().items()})

    def check_unchanged(self) -> None:
        """Every teacher folder still holds what the `teacher` stage recorded (`record.check_unchanged`)."""
        for path in self.folders().values():
            check_unchanged(path)

    def check_domains(self, domains: Optional[Iterable[str]], where: str) -> None:
        """Every prompt's domain has a teacher. One teacher answers every domain (or a prompt set without any)."""
        if self.routes is None:
            return
        if domains is None:
            raise TeacherRoutingError(
                f"{where}: the prompts have no 'domain' column, but {self.root} holds one teacher per domain "
                f"({', '.join(self.routes)}); give the prompts a domain (task.kind addition+reverse, or a "
                f"'domain' column in task.prompt_file), or set teacher.domains: {{}}")
        unknown = sorted(set(domains) - set(self.routes))
        if unknown:
            raise TeacherRoutingError(
                f"{where}: prompt domain {unknown[0]!r} has no teacher ({self.root / ROUTES_FILE} routes "
                f"{', '.join(self.routes)}); add `{unknown[0]}: {{}}` to teacher.domains and rerun `dvc repro`")

    def prompt_domains(self, prompts_path: Path) -> Optional[dict[str, str]]:
        """prompt_id -> domain of a prompt set, every domain checked to have a teacher; None with one teacher."""
        if self.routes is None:
            return None
        table = read_prompts(prompts_path)
        domains = prompt_domains(table)
        self.check_domains(domains, str(prompts_path))
        return dict(zip(table.column("prompt_id").to_pylist(), domains))


def check_config_domains(configured: Iterable[str], domains: Optional[list[str]], where: str, prompts: Path) -> None:
    """The `teacher` stage's check of `teacher.domains` (`where`) against the SFT prompts' domains: every prompt's
    domain has a teacher, and every configured domain has prompts (else it is a typo)."""
    configured = list(configured)
    if domains is None:
        raise TeacherRoutingError(f"{where}: names {', '.join(configured)}, but {prompts} has no 'domain' column; "
                                  f"use task.kind addition+reverse or a prompt file with a 'domain' column, or "
                                  f"domains: {{}}")
    found = sorted(set(domains))
    unknown = [d for d in found if d not in configured]
    if unknown:
        raise TeacherRoutingError(f"{where}: no teacher for prompt domain {unknown[0]!r} of {prompts}; add "
                                  f"`{unknown[0]}: {{}}` (its own teacher) or `{unknown[0]}: <another domain>`")
    unused = [d for d in configured if d not in found]
    if unused:
        raise TeacherRoutingError(f"{where}.{unused[0]}: no prompt in {prompts} has this domain (found: "
                                  f"{', '.join(found)}); fix the name or remove the key")


def row_domains(domains: Optional[dict[str, str]], prompt_ids: list[str], where: Path) -> Optional[list[str]]:
    """The domain of each row by its prompt_id (`Teachers.prompt_domains`); None with one teacher."""
    if domains is None:
        return None
    out = [domains.get(p) for p in prompt_ids]
    if None in out:
        raise TeacherRoutingError(f"{where}: prompt {prompt_ids[out.index(None)]!r} is not in the prompt set that "
                                  f"gives the domains; pass the prompt set the rows were made from with --prompts")
    return out


def load_teachers(root: Path | str) -> Teachers:
    """The teacher(s) a `teacher` stage output holds, with each domain folder checked to be its domain's."""
    root = Path(root)
    path = root / ROUTES_FILE
    if not path.exists():
        return Teachers(root, None)
    try:
        routes = json.loads(path.read_text())["routes"]
        assert isinstance(routes, dict) and all(isinstance(v, str) for v in routes.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise TeacherRoutingError(f"{path}: not a teacher routing file ({{\"routes\": {{domain: folder}}}}); "
                                  f"{FIX_ROUTES}") from None
    for name in sorted(set(routes.values())):
        record = root / name / PROVENANCE_FILE
        try:
            recorded = json.loads(record.read_text()).get("domain")
        except (OSError, ValueError):
            raise TeacherRoutingError(f"{record}: missing or unreadable, but {path} routes prompts to "
                                      f"{root / name}; {FIX_ROUTES}") from None
        if recorded != name:
            raise TeacherRoutingError(f"{root / name}: holds the teacher of domain {recorded!r} (its {PROVENANCE_FILE}), "
                                      f"not of domain {name!r}: teacher folders were swapped or copied; {FIX_ROUTES}")
    return Teachers(root, dict(routes))
