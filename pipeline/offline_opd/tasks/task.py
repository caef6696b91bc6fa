"""A task: where the prompt splits come from. Only `prepare` (splits) and `evaluate` (verifier) use tasks.

Every task returns the same prompt contract (pipeline/offline_opd/contract/prompts.py), so nothing downstream knows which
task made the prompts; the verifier is chosen separately in params (pipeline/offline_opd/tasks/verifiers.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pyarrow as pa

from offline_opd.config import TaskConfig


class Task(Protocol):
    def splits(self) -> dict[str, pa.Table]:
        """The sft, opd and eval prompt tables, disjoint, in offline_opd.contract.prompts.PROMPT_SCHEMA."""
        ...


def make_task(cfg: TaskConfig, params: Path) -> Task:
    """The task named by `task.kind`; `params` (the parameter file) locates prompt_files/ and names errors."""
    if cfg.kind == "addition":
        from offline_opd.tasks.addition import AdditionTask

        return AdditionTask(cfg, params)
    if cfg.kind == "addition+reverse":
        from offline_opd.tasks.mixture import MixtureTask

        return MixtureTask(cfg)
    from offline_opd.tasks.prompt_file import PromptFileTask

    return PromptFileTask(cfg, params)
