"""The whole params file, checked the way every stage and `opd-preset` load it.

`offline_opd.config` holds the schema and every rule that needs only the parsed sections; this module
adds what needs the project's registries: the loss name and its parameters through
`train.losses.loss_spec` (so the one loss registry decides what a valid loss is), the rule that reads
the parsed loss (pg's baseline against the shard selection), and the verifier's name. A module apart,
because the loss registry imports the schema, so the schema cannot import it back
(tests/test_import_graph.py allows no cycle, lazy imports included).

The imports inside `check_registries` are validation only (tests/test_dag.py): no stage's output
depends on them, and the stages that use the registry or the verifiers import them themselves. They
cost one torch import (the registry's kernels need it) where torch would not be loaded anyway:
`opd-preset check qwen3` took 1.7 s against 0.13 s for the schema alone, and `prepare` of the CI
preset 1.9-2.3 s against 0.5 s (2-core shared VM, load average 2). A torch-free registry would
remove that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offline_opd.config import DEFAULT_PARAMS, SECTIONS, ConfigError, load_params


def load_checked(section: str, path: Path | str = DEFAULT_PARAMS) -> Any:
    """One section's dataclass, after every section present in the file passed every check."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    cfgs = load_params(path, required=(section,))
    check_registries(cfgs, str(path))
    return cfgs[section]


def check_file(path: Path | str) -> dict[str, Any]:
    """Every section required and checked: what `opd-preset` runs on a preset."""
    cfgs = load_params(path, required=tuple(SECTIONS))
    check_registries(cfgs, str(path))
    return cfgs


def check_registries(cfgs: dict[str, Any], path: str) -> None:
    """The loss and its parameters, pg's baseline against the shards, and the verifier's name."""
    distill, topk, evaluate = cfgs.get("distill"), cfgs.get("teacher_topk"), cfgs.get("evaluate")
    if distill is not None:
        from offline_opd.train.losses import loss_spec

        spec = loss_spec(distill.loss, distill.loss_params, f"{path}: distill")
        if topk is not None and spec.objective.get("baseline", 0.0) > 0 and topk.selection == "sampled":
            raise ConfigError(f"{path}: distill.loss_params.baseline: pg's baseline needs the teacher's exact "
                              f"tail, which teacher_topk.selection sampled does not store; set baseline: 0, or "
                              f"selection topk or topk+sampled")
    if evaluate is not None:
        from offline_opd.tasks.verifiers import check_verifier

        check_verifier(evaluate.verifier, f"{path}: evaluate.verifier")
