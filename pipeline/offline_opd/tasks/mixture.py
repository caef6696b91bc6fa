"""`task.kind: addition+reverse`: the two-domain toy of multi-teacher OPD (README: Multi-teacher OPD).

Every split holds both sub-tasks, interleaved (so every part of every stage mixes them, as a real mixture
would), each prompt tagged with its `domain` (`add` or `rev`): `teacher.domains` then names a teacher per
domain. Each split is cut in half (the odd prompt goes to `add`); `task.digits` sets the addition operands'
digits and the reversed strings' length is digits + 2, so both sub-tasks have responses of similar length.
"""

from __future__ import annotations

import pyarrow as pa

from offline_opd.config import TaskConfig
from offline_opd.contract.prompts import DOMAIN_PROMPT_SCHEMA
from offline_opd.tasks import addition, reverse

DOMAINS = ("add", "rev")


class MixtureTask:
    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    def splits(self) -> dict[str, pa.Table]:
        cfg = self.cfg
        sizes = {"sft": cfg.n_sft, "opd": cfg.n_opd, "eval": cfg.n_eval}
        halves = {name: ((n + 1) // 2, n // 2) for name, n in sizes.items()}
        adds = addition.make_splits(cfg.digits, {k: v[0] for k, v in halves.items()}, cfg.seed)
        revs = reverse.make_splits(cfg.digits + 2, {k: v[1] for k, v in halves.items()}, cfg.seed)
        out = {}
        for name in sizes:
            a, r = adds[name], revs[name]
            rows = []   # interleaved: add, rev, add, rev, ... (an odd split ends with an addition)
            for i, problem in enumerate(a):
                rows.append((problem, DOMAINS[0]))
                if i < len(r):
                    rows.append((r[i], DOMAINS[1]))
            out[name] = pa.table({"prompt_id": [p.prompt_id for p, _ in rows], "prompt": [p.prompt for p, _ in rows],
                                  "answer": [p.answer for p, _ in rows], "reference": [p.solution for p, _ in rows],
                                  "domain": [d for _, d in rows]}, schema=DOMAIN_PROMPT_SCHEMA)
        return out
