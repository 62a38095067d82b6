"""The generation sweep: a user's generation task files (instruction data scored by the reference completions'
per-token log-likelihood and by greedy answers) ported over the drift levels, and the forecast of both.

Per task a patch per seed is trained on θ; per evolved base θ' its runtime-attached θ'+Δθ (equal to the port:
tests/test_port.py) is scored on the eval rows against θ+Δθ: the change in the reference log-likelihood
(nats/token, paired over rows) and the share of greedy answers that change. The forecast's signals for the same
cell come from the task's *train* rows, never the scored ones: what a user has (their own data) against what
they will meet (the rows they score). The validation says how well the first carries to the second on a task
the calibration never saw (leave one task out) and on a drift level it never saw (grouped by patch).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import PortLLMError
from ..forecast import CompletionOutputs, Generation, Inputs, completion_signals, model_outputs
from ..models import family_of
from ..patch import Patch
from ..stats import paired_bootstrap
from ..tasks import get_task, task_key
from .calibrate import is_control, level_folds, rms, spearman, task_folds
from .generation_report import chart, markdown
from .plan import SweepPlan, TaskRecipe
from .run import Log, Records, SweepContext, build_bases, on_grid

SIGNALS_FROM = "the task's train rows (disjoint from the scored eval rows)"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def outcome(a: Records, b: Records) -> dict[str, Any]:
    """θ+Δθ (a) against θ'+Δθ (b) on the same eval rows: the paired change in the reference log-likelihood and
    the share of greedy answers that differ (with its bootstrap interval)."""
    if [r["idx"] for r in a] != [r["idx"] for r in b]:
        raise PortLLMError("the two runs scored different rows; rerun the sweep with one eval limit")
    la, lb = [r["loglik"] for r in a], [r["loglik"] for r in b]
    change, lo, hi = paired_bootstrap(la, lb, iters=2000)
    flags = [float(x["output"] != y["output"]) for x, y in zip(a, b)]
    share, slo, shi = paired_bootstrap([0.0] * len(flags), flags, iters=2000)
    out = {
        "n": len(a),
        "loglik_a": _mean(la),
        "loglik_b": _mean(lb),
        "loglik_change": change,
        "loglik_change_ci": [lo, hi],
        "outputs_changed": share,
        "outputs_changed_ci": [slo, shi],
    }
    if "chrf" in a[0]:
        out["chrf_a"], out["chrf_b"] = _mean([r["chrf"] for r in a]), _mean([r["chrf"] for r in b])
    return out


def learned(zero: Records, with_patch: Records) -> dict[str, Any]:
    """Did the patch learn? θ+Δθ against θ zero-shot on the eval rows' reference log-likelihood (paired)."""
    la, lb = [r["loglik"] for r in zero], [r["loglik"] for r in with_patch]
    gain, lo, hi = paired_bootstrap(la, lb, iters=2000)
    se = (hi - lo) / (2 * 1.96) if hi > lo else 0.0
    return {"loglik_theta": _mean(la), "loglik_patched": _mean(lb), "gain": gain, "gain_ci": [lo, hi],
            "z": gain / se if se else None, "learned": bool(se and gain / se > 2)}  # fmt: skip


class Signals:
    """The forecast's signals of one (task, seed) patch on each base, cached per base; θ+Δθ's own outputs on
    the train rows are computed once (only when some base still needs them) and kept in memory."""

    def __init__(self, ctx: SweepContext, task: str, patch: Path, inputs: Inputs):
        self.ctx, self.task, self.patch, self.inputs = ctx, task, patch, inputs
        self.sha = Patch.load(patch, verify=False).weights_sha256
        self._a: CompletionOutputs | None = None

    def on(self, lv: dict[str, Any]) -> dict[str, Any]:
        i = self.inputs
        parts = (self.ctx.fp, lv["fingerprint"], self.sha, task_key(self.task), i.n, i.split, asdict(i.gen))

        def make() -> dict[str, Any]:
            dtype = self.ctx.plan.eval_dtype
            if self._a is None:
                self.ctx.log(f"  signals: θ+Δθ on {i.n} train rows of {self.task} ...")
                self._a = model_outputs(self.ctx.theta, self.patch, i, dtype, "cpu")
            self.ctx.log(f"  signals: θ'+Δθ on {lv['label']} ...")
            b = model_outputs(lv["dir"], self.patch, i, dtype, "cpu")
            return asdict(completion_signals(self._a, b, self.task))

        return self.ctx.cache.json("gen_signals", parts, make)


def task_cells(ctx: SweepContext, name: str, r: TaskRecipe, levels: list[dict[str, Any]]) -> dict[str, Any]:
    """One generation task: its patches, whether they learned, and a cell per (base, seed)."""
    task = get_task(name)
    if task.kind != "gen" or "loglik" not in task.gen_metrics:
        raise PortLLMError(f"{name}: the generation sweep needs a generation task with generation.metrics: [loglik]")
    plan = ctx.plan
    zero = ctx.score(ctx.theta, ctx.fp, None, False, name, r.eval_limit)
    ctx.log(f"[{task.name}] {len(zero)} eval rows; θ zero-shot loglik {_mean([x['loglik'] for x in zero]):.4f}")
    gen = Generation(plan.signal_outputs, task.max_new_tokens, task.stop)
    inputs = Inputs(name, plan.signal_rows, ctx.data, "train", gen)
    seeds, cells = {}, []
    for s in plan.seeds:
        patch = ctx.patch_on(ctx.theta, ctx.fp, name, r, s)
        with_patch = ctx.score(ctx.theta, ctx.fp, patch, False, name, r.eval_limit)
        seeds[s] = learned(zero, with_patch)
        ctx.log(f"  seed {s}: loglik gain {seeds[s]['gain']:+.4f} (z {seeds[s]['z']:.1f})")
        signals = Signals(ctx, name, patch, inputs)
        for lv in levels:
            if not on_grid(r, lv):
                continue
            ported = ctx.score(lv["dir"], lv["fingerprint"], patch, False, name, r.eval_limit)
            evolved = ctx.score(lv["dir"], lv["fingerprint"], None, False, name, r.eval_limit)
            cell = {
                "task": task.name,
                "seed": s,
                "level": lv["label"],
                "t": lv["t"],
                "real": lv["t"] is None,
                "drift": lv["drift"],
                "measured": outcome(with_patch, ported),
                "patch_on_evolved": learned(evolved, ported),  # θ'+Δθ against θ' zero-shot: does it still help?
                "signals": signals.on(lv),
                "signals_inputs": SIGNALS_FROM,
            }
            m = cell["measured"]
            ctx.log(
                f"  {lv['label']} seed {s}: loglik {m['loglik_change']:+.4f} nats/token, "
                f"{m['outputs_changed']:.0%} answers changed (signals {cell['signals']['loglik_change']:+.4f}, "
                f"{cell['signals']['outputs_changed']:.0%})"
            )
            cells.append(cell)
    return {"task": task.name, "source": name, "eval_rows": len(zero), "seeds": seeds, "cells": cells}


# ---- calibration and its validation ----------------------------------------------------------------------

TARGETS = {  # what is forecast: (measured field, signal field, scale to report units, unit)
    "loglik": ("loglik_change", "loglik_change", 1.0, "nats/token"),
    "changed": ("outputs_changed", "outputs_changed", 100.0, "points"),
}


def _slope(cells: list[dict[str, Any]], what: str) -> float:
    """Least squares through the origin: measured ≈ a · signal (no signal, no forecast)."""
    m, s, _, _ = TARGETS[what]
    xs, ys = [c["signals"][s] for c in cells], [c["measured"][m] for c in cells]
    den = sum(x * x for x in xs)
    if not den:
        raise PortLLMError(f"no {what} signal in any of the {len(cells)} cells: nothing to fit a calibration on")
    return sum(x * y for x, y in zip(xs, ys)) / den


def _residuals(cells: list[dict[str, Any]], what: str, a: float) -> list[float]:
    m, s, scale, _ = TARGETS[what]
    return [scale * (c["measured"][m] - a * c["signals"][s]) for c in cells]


def _interval(c: dict[str, Any], what: str, a: float, sd: float) -> tuple[float, float]:
    """The forecast's 95% interval for a cell: its signal's sampling interval scaled by a, widened by 1.96 sd."""
    _, s, scale, _ = TARGETS[what]
    lo, hi = (a * v * scale for v in c["signals"][f"{s}_ci"])
    return min(lo, hi) - 1.96 * sd, max(lo, hi) + 1.96 * sd


def protocol_figures(cells: list[dict[str, Any]], folds: list[Any] | None, what: str) -> dict[str, Any]:
    """Held-out figures for one target: each test cell forecast from a slope fitted on its fold's train cells
    (folds None: the raw signal, slope 1, no fit), with an interval whose width comes from the train cells'
    residuals only; MAE, Spearman ρ, bias and the share of held-out cells inside their interval."""
    m, s, scale, unit = TARGETS[what]
    rows = []
    for f in folds if folds is not None else [None]:
        test, train = (cells, cells) if f is None else (f.test, f.train)
        if f is not None and len(train) < 2:
            continue
        a = 1.0 if f is None else _slope(train, what)
        sd = rms(_residuals(train, what, a)) if f is not None else 0.0
        for c in test:
            pred, meas = scale * a * c["signals"][s], scale * c["measured"][m]
            lo, hi = _interval(c, what, a, sd)
            rows.append((pred, meas, lo <= meas <= hi))
    if not rows:
        return {"cells": 0, "mae": None, "spearman": None, "bias": None, "interval_coverage": None, "unit": unit}
    return {
        "cells": len(rows),
        "mae": _mean([abs(p - y) for p, y, _ in rows]),
        "bias": _mean([p - y for p, y, _ in rows]),
        "spearman": spearman([p for p, _, _ in rows], [y for _, y, _ in rows]),
        "interval_coverage": _mean([float(k) for _, _, k in rows]),
        "unit": unit,
    }


def validate(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per target: raw (the signal as measured on the train rows, no calibration), leave one task out (the
    headline: a user's task is never in the calibration) and leave one level out grouped by patch."""
    used = [c for c in cells if not is_control(c)]
    tasks = {c["task"] for c in used}
    out: dict[str, Any] = {"controls": len(cells) - len(used), "cells": len(used), "signals_inputs": SIGNALS_FROM}
    for what in TARGETS:
        out[what] = {
            "raw": protocol_figures(used, None, what),
            "leave_one_task_out": protocol_figures(used, task_folds(used), what)
            if len(tasks) >= 2
            else {"cells": 0, "reason": "one task: nothing to leave out"},
            "leave_one_level_out": protocol_figures(used, level_folds(used), what),
        }
    return out


def fit(cells: list[dict[str, Any]], run: str, family: str) -> dict[str, Any]:
    """The generation calibration `forecast` ships: slopes on every non-control cell, residual sds out of
    sample (leave one task out where there are ≥ 2 tasks, else leave one level out)."""
    used = [c for c in cells if not is_control(c)]
    if len(used) < 4:
        raise PortLLMError(f"a generation calibration needs ≥ 4 cells off the t = 0 control; got {len(used)}")
    folds, how = (task_folds(used), "leave one task out") if len({c["task"] for c in used}) >= 2 else (
        level_folds(used), "leave one level out")  # fmt: skip
    sds = {}
    for what in TARGETS:
        resid = []
        for f in folds:
            if len(f.train) >= 2:
                resid += _residuals(f.test, what, _slope(f.train, what))
        sds[what] = rms(resid) if resid else None
    tasks = ", ".join(sorted({c["task"] for c in used}))
    return {
        "gen_loglik_a": _slope(used, "loglik"),
        "gen_loglik_sd": sds["loglik"],
        "gen_changed_a": _slope(used, "changed"),
        "gen_changed_sd_points": sds["changed"],
        "gen_source": f"{run}: fitted on {len(used)} generation sweep cells ({tasks}); residual sd out of sample "
        f"({how}); signals from {SIGNALS_FROM}",
        "gen_family": family,
    }


# ---- the run and its report ------------------------------------------------------------------------------


def generation_sweep(
    plan: SweepPlan, base: str, out: Path, data: Path, cache: str | Path | None, log: Log, progress: bool
) -> dict[str, Any]:
    """Run (or resume) the generation grid; write OUT/report.json, report.md, calibration.json, generation.png."""
    t_start = time.perf_counter()
    ctx = SweepContext.open(plan, base, data, cache, log, progress)
    levels = build_bases(ctx)
    report: dict[str, Any] = {}
    tasks = []
    for name, recipe in plan.tasks.items():
        tasks.append(task_cells(ctx, name, recipe, levels))
        report = write(ctx, tasks, levels, base, out, t_start)  # after every task: a stopped run shows its cells
    return report


def write(
    ctx: SweepContext, tasks: list[dict[str, Any]], levels: list[dict[str, Any]], base: str, out: Path, t0: float
) -> dict[str, Any]:
    family = family_of(ctx.theta)
    cells = [c | {"family": base} for t in tasks for c in t["cells"]]
    run = f"portllm sweep --plan {ctx.plan.name} ({len(cells)} cells)"
    n_used = sum(not is_control(c) for c in cells)
    report = {
        "plan": ctx.plan.to_dict(),
        "base": {"name": base, "fingerprint": ctx.fp, "model_family": family},
        "levels": [{k: v for k, v in lv.items() if k != "dir"} for lv in levels],
        "tasks": [{k: v for k, v in t.items() if k != "cells"} for t in tasks],
        "cells": cells,
        "forecast_validation": validate(cells),
        "calibration": fit(cells, run, family) if n_used >= 4 else None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "wall_s": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    if report["calibration"]:
        write_text_atomic(out / "calibration.json", json.dumps(report["calibration"], indent=2))
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    write_text_atomic(out / "report.md", markdown(report))
    chart(report, out)
    return report
