"""Model-GLUE-style selective merging, and the held-out scorer it climbs on.

Merging everything can be worse than merging a few: candidates are added one at a time and kept
only if a held-out score does not drop. The score comes from a slice of each task's train part,
never its eval part, so the reported eval numbers stay clean.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PortLLMError
from ..eval import open_lm, run_task
from ..patch import Patch
from ..tasks import load_rows, parse_tasks
from .core import merge
from .similarity import similarity


def greedy_select(
    patches: list[Patch],
    score: Callable[[Patch], float],
    method: str = "linear",
    order: str = "score",
    log: Callable[[str], None] = print,
    **merge_kw: Any,
) -> tuple[Patch, list[dict[str, Any]]]:
    """Add candidates one at a time (best own score first, or most similar to the best), keeping each only if
    the merged held-out score does not drop; returns the best merge and the trajectory."""
    own = [score(p) for p in patches]
    idx = list(range(len(patches)))
    if order == "score":
        idx.sort(key=lambda i: -own[i])
    elif order == "similarity":
        sim = similarity(patches)
        first = max(idx, key=lambda i: own[i])
        idx = [first] + sorted((i for i in idx if i != first), key=lambda i: -sim[first][i])
    else:
        raise PortLLMError(f"unknown order {order!r}; use score or similarity")
    chosen = [idx[0]]
    best, _ = merge([patches[idx[0]]], method, **merge_kw)
    best_score = own[idx[0]]
    trajectory = [
        {"candidate": str(patches[idx[0]].path), "own_score": own[idx[0]], "merged_score": best_score, "kept": True}
    ]
    log(f"start with {patches[idx[0]].path}: {best_score:.4f}")
    for i in idx[1:]:
        trial, _ = merge([patches[k] for k in chosen + [i]], method, **merge_kw)
        s = score(trial)
        keep = s >= best_score
        trajectory.append({"candidate": str(patches[i].path), "own_score": own[i], "merged_score": s, "kept": keep})
        log(f"{'keep' if keep else 'drop'} {patches[i].path}: merged score {s:.4f} (best {best_score:.4f})")
        if keep:
            chosen.append(i)
            best, best_score = trial, s
    best.extra["selection"] = {
        "order": order,
        "trajectory": trajectory,
        "chosen": [str(patches[k].path) for k in chosen],
    }
    return best, trajectory


def heldout_scorer(
    base: str | Path, tasks: str, limit: int = 100, data: str | Path | None = None
) -> Callable[[Patch], float]:
    """Mean score over `tasks` of base + patch on the last `limit` rows of each task's train part."""
    task_list = parse_tasks(tasks)
    slices = {}
    for t in task_list:
        rows = load_rows(t, "train", data)[-limit:]
        slices[t.name] = [t.make(i, r) for i, r in enumerate(rows)]

    def score(patch: Patch) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Patch(patch.config, patch.tensors, patch.manifest)  # saved as a copy: the caller's keeps its path
            copy.save(Path(tmp) / "p")
            lm = open_lm(base, Path(tmp) / "p")
            return sum(run_task(lm, t, slices[t.name]).value for t in task_list) / len(task_list)

    return score
