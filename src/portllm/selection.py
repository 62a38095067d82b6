"""Held-out scoring for selective merging: a slice of the train part, never the eval part."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .patch import Patch


def heldout_scorer(
    base: str | Path, tasks: str, limit: int = 100, data: str | Path | None = None
) -> Callable[[Patch], float]:
    """Mean score over `tasks` of base + patch on the last `limit` rows of each task's train part."""
    import tempfile

    from .evaluate import open_lm, run_task
    from .tasks import load_rows, parse_tasks

    task_list = parse_tasks(tasks)
    slices = {}
    for t in task_list:
        rows = load_rows(t, "train", data)[-limit:]
        slices[t.name] = [t.make(i, r) for i, r in enumerate(rows)]

    def score(patch: Patch) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            Patch(patch.config, patch.tensors, patch.manifest).save(
                Path(tmp) / "p"
            )  # a copy: the caller's patch keeps its path
            lm = open_lm(base, Path(tmp) / "p")
            return sum(run_task(lm, t, slices[t.name]).value for t in task_list) / len(task_list)

    return score
