"""A task: where the prompt splits come from. Only `prepare` (splits) and `evaluate` (verifier) use tasks.

Every task returns the same prompt contract (pipeline/prompts.py), so nothing downstream knows which
task made the prompts; the verifier is chosen separately in params (pipeline/tasks/verifiers.py).
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from pipeline.config import TaskConfig


class Task(Protocol):
    def splits(self) -> dict[str, pa.Table]:
        """The sft, opd and eval prompt tables, disjoint, in pipeline.prompts.PROMPT_SCHEMA."""
        ...


def make_task(cfg: TaskConfig, where: str) -> Task:
    """The task named by `task.kind`; `where` (the params file) goes into error messages."""
    if cfg.kind == "addition":
        from pipeline.tasks.addition import AdditionTask

        return AdditionTask(cfg)
    from pipeline.tasks.prompt_file import PromptFileTask

    return PromptFileTask(cfg, where)
