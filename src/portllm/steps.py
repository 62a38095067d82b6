"""The steps experiments are made of: train a patch, port it, repair it, score a model on one task.

`portllm reproduce` runs them on its grid; a drift sweep or a routing study runs the same steps on
other grids. Training, porting and repair each run in their own process (`isolate.run`), so the time and
peak memory they record are the step's own and not the experiment's; scoring runs in the caller's
process. The arguments are plain values (paths, names, a config), so any grid can cache by them.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace
from pathlib import Path

from . import isolate
from .eval import TaskResult, evaluate, open_lm
from .port import PortResult, port
from .repair import RepairResult, repair
from .tasks import get_task
from .train import TrainConfig, TrainResult, train


def train_patch_step(
    base: str | Path,
    task: str,
    out: str | Path,
    cfg: TrainConfig,
    data: str | Path | None,
    progress: bool = False,
    init: str | Path | None = None,
) -> TrainResult:
    """Train a LoRA patch for `task` on `base` into `out` (replaced), in its own process.

    `init`: warm-start from this patch's factors (rank, alpha and targets then are the patch's).
    The patch's manifest records the run's own wall time and peak RSS (extra.training).
    """

    result, _ = isolate.run(
        train,
        str(base),
        task,
        Path(out),
        cfg,
        data=data,
        eval_limit=0,
        overwrite=True,
        progress=progress,
        init=None if init is None else Path(init),
    )
    return result


def port_step(patch: str | Path, base: str | Path, out: str | Path, progress: bool = False) -> PortResult:
    """Merge `patch` onto `base` into `out` (replaced), in its own process; `result.usage` is the port's own."""
    result, _ = isolate.run(port, Path(patch), str(base), Path(out), overwrite=True, progress=progress)
    return result


def eval_step(
    model: str | Path,
    patch: str | Path | None,
    task: str,
    limit: int | None,
    data: str | Path | None,
    out: str | Path,
    dtype: str = "float32",
    gen_tokens: int | None = None,
    show_progress: bool = False,
    device: str = "cpu",
) -> TaskResult:
    """Score `model` (+ `patch` at runtime) on one task into the run directory `out`, all or nothing.

    `gen_tokens` caps generation for generative tasks (GSM8K). A directory that exists is replaced.
    `device`: a resolved device (device.resolve_device) the model is opened on.
    """

    t = get_task(task)
    if t.kind == "gen" and gen_tokens:
        t = replace(t, max_new_tokens=gen_tokens)
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lm = open_lm(model, patch, dtype=dtype, device=device)
    try:
        result = evaluate(lm, [t], limit=limit, data=data, out=tmp, show_progress=show_progress)
    finally:
        del lm
        gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return result.tasks[t.name]


def repair_step(patch: str | Path, base: str | Path, old: str | Path, out: str | Path, **kw) -> RepairResult:
    """Repair `patch` (made on `old`) for `base` into `out` (replaced), in its own process; the result's wall
    time and peak RSS are the repair's own (teacher targets and student training together)."""
    result, _ = isolate.run(repair, Path(patch), str(base), str(old), Path(out), overwrite=True, **kw)
    return result
