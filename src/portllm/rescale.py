"""A training-free correction for a ported patch: rescale Δθ so θ'+λΔθ answers like θ+Δθ.

Drift can damp or amplify what the patch does on the new base. Without labels, the user can still
ask θ+Δθ and θ'+λΔθ the same unlabeled task inputs and keep the λ under which the ported model
agrees most with the original one (ties: the smaller KL, then the λ closest to 1). The inputs come
from the task's train split, so the eval examples that later judge the correction are not used to
choose it. The sweep measures whether this helps; it is kept only where it does.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import PortLLMError
from .eval import open_lm, run_task
from .forecast import choice_signals
from .patch import Patch
from .tasks import get_task, load_examples

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class ScaleChoice:
    scale: float
    n: int  # unlabeled inputs used
    agreement: dict[str, float]  # λ -> agreement of θ'+λΔθ with θ+Δθ
    kl: dict[str, float]  # λ -> mean KL(θ+Δθ ‖ θ'+λΔθ) over the answer options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scaled_patch(patch: str | Path, scale: float, out: str | Path) -> Path:
    """A copy of the patch with B (so ΔW) multiplied by `scale`, still declared for its own base."""
    p = Patch.load(patch)
    event = {"op": "rescale", "scale": scale}
    base = p.manifest.base if p.manifest and p.manifest.base else {}
    p.restamped(base, event, scale=scale).save(out, overwrite=True)
    return Path(out)


def _records(
    model: str | Path, patch: str | Path, task: Any, examples: list[Any], dtype: str, device: str
) -> list[dict]:
    """One model's per-choice records, the model freed after: one model in memory at a time."""
    lm = open_lm(model, patch, dtype=dtype, device=device)
    try:
        return run_task(lm, task, examples).records
    finally:
        del lm
        gc.collect()


def choose_scale(
    patch: str | Path,
    old: str | Path,
    new: str | Path,
    task: str,
    n: int = 150,
    scales: tuple[float, ...] = SCALES,
    data: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> ScaleChoice:
    """The λ whose θ'+λΔθ agrees most with θ+Δθ on `n` unlabeled train-split inputs of `task`."""
    t = get_task(task)
    if t.kind != "mc":
        raise PortLLMError(f"{t.name} is a generation task; choosing λ needs a task with answer options")
    examples = load_examples(t, "train", data, n)
    ref = _records(old, patch, t, examples, dtype, device)
    agreement: dict[str, float] = {}
    kl: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=".rescale-") as tmp:
        for s in scales:
            p = patch if s == 1.0 else scaled_patch(patch, s, Path(tmp) / f"x{s:g}")
            sig = choice_signals(ref, _records(new, p, t, examples, dtype, device), examples, t)
            agreement[f"{s:g}"], kl[f"{s:g}"] = 1.0 - sig.disagreement, sig.mean_kl
    best = max(scales, key=lambda s: (round(agreement[f"{s:g}"], 9), -kl[f"{s:g}"], -abs(s - 1.0)))
    return ScaleChoice(best, len(examples), agreement, kl)
