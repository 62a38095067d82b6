"""Turning the forecast's raw signals into points, and checking it the way a user meets it.

The raw unlabeled estimate (θ+Δθ's own probabilities as the belief about the right answer) is mapped to the
measured loss by least squares on a sweep's cells, together with the weight signal (drift inside the patch
subspace); the negative-flip rate, from the raw flip estimate and the plain disagreement between θ+Δθ and θ'+Δθ.

The validation (`validate`) is built so its figures are the ones a user meets:
- the t = 0 controls (θ' = θ: 0 predicted = 0 measured by construction) are counted and left out of every
  figure, and out of the fit, since they would flatter both;
- every fold keeps each patch (family, task, seed) on one side only. Leave one task out is the headline (a
  user's task is never in the calibration); leave one family out carries it to a base family it never saw
  (with one family: no figures, and the reason); leave one level out is kept beside them, grouped by patch:
  its held-out cells are one drift level of one seed (every task at that level), and the map is fitted on the
  other levels of the other patches. With a single seed that grouping is impossible; the fold then falls back
  to plain leave-one-level-out and says so (`grouped_by_patch: false`);
- the 95% interval of a held-out cell is its prediction ± 1.96 × the RMS of the other folds' held-out residuals
  (each out of sample for its own cell), never the in-sample spread; `interval_coverage` is the share of
  held-out cells inside their interval. A stricter width (the protocol run again inside each fold's training
  cells) is reported beside it with its median width: with three tasks its inner fits see one task each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import PortLLMError
from ..forecast import Calibration

Cell = dict[str, Any]
Z95 = 1.96
GOALS: dict[str, Any] = {  # issue 21's goals, on cells no fit saw
    "leave_one_task_out": {"spearman_loss": 0.8, "mae_neg_flip_rate_points": 2.0, "mae_loss_points": 2.5},
    "leave_one_family_out": {"spearman_loss": 0.8},
    "interval_coverage": [0.90, 0.98],
}


def ranks(x: list[float]) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's ρ needs)."""
    a = np.asarray(x, dtype=np.float64)
    order = a.argsort(kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a), dtype=np.float64)
    for v in np.unique(a):
        idx = a == v
        r[idx] = r[idx].mean()
    return r


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def is_control(c: Cell) -> bool:
    """A t = 0 control: θ' = θ, so the port is θ+Δθ itself and every signal and outcome is 0."""
    return c.get("drift") == 0 or c.get("t") == 0


def patch_of(c: Cell) -> tuple[Any, Any, Any]:
    """The patch a cell ports: one (family, task, seed) is one Δθ, scored on every base of the grid."""
    return c.get("family"), c["task"], c["seed"]


@dataclass(frozen=True)
class Fold:
    """One split: the map is fitted on `train` and predicts `test`; no patch is in both."""

    held: str
    test: list[Cell]
    train: list[Cell]


Protocol = Callable[[list[Cell]], list[Fold]]


def _by(cells: list[Cell], key: Callable[[Cell], Any]) -> list[Fold]:
    values = sorted({key(c) for c in cells}, key=str)
    return [Fold(str(v), [c for c in cells if key(c) == v], [c for c in cells if key(c) != v]) for v in values]


def task_folds(cells: list[Cell]) -> list[Fold]:
    """Leave one task out (a task's patches are its own, so patches never straddle)."""
    return _by(cells, lambda c: c["task"])


def family_folds(cells: list[Cell]) -> list[Fold]:
    """Leave one base family out."""
    return _by(cells, lambda c: c["family"])


def level_folds(cells: list[Cell]) -> list[Fold]:
    """Leave one level out, grouped by patch: hold out one level of one seed; train on the other levels of
    every patch not held out. With one seed per task there is nothing to group by: plain leave-one-level-out."""
    if not grouped_by_patch(cells):
        return _by(cells, lambda c: c["level"])
    folds = []
    for level in sorted({c["level"] for c in cells}):
        for seed in sorted({c["seed"] for c in cells if c["level"] == level}, key=str):
            test = [c for c in cells if c["level"] == level and c["seed"] == seed]
            held = {patch_of(c) for c in test}
            train = [c for c in cells if c["level"] != level and patch_of(c) not in held]
            folds.append(Fold(f"{level}, seed {seed}", test, train))
    return folds


def grouped_by_patch(cells: list[Cell]) -> bool:
    """Whether leave-one-level-out can keep patches apart: every task needs ≥ 2 seeds."""
    seeds: dict[Any, set] = {}
    for c in cells:
        seeds.setdefault((c.get("family"), c["task"]), set()).add(c["seed"])
    return bool(seeds) and all(len(s) >= 2 for s in seeds.values())


@dataclass(frozen=True)
class Form:
    """Which signals the map from raw signals to points uses, each term fitted through the origin."""

    name: str
    disturbance: bool  # loss ≈ a·raw_loss (+ b·subspace disturbance)
    disagreement: bool  # neg-flip rate ≈ flip_a·raw_flips (+ flip_b·disagreement)


FORMS = {
    # the shipped form (issue 21): one signal per figure. On unseen tasks the extra terms of the earlier form
    # fitted task-specific slopes (SmolLM2, leave one task out: flip MAE 4.64 -> 4.16, ρ 0.79 -> 0.84); both
    # forms' figures are in report.json's forecast_validation["forms"]
    "raw": Form("raw", False, False),
    "raw+weights+disagreement": Form("raw+weights+disagreement", True, True),  # the form before 2026-12-04
}
FORM = FORMS["raw"]


def _coefficients(cells: list[Cell], form: Form = FORM) -> tuple[float, float, float, float]:
    """Least squares in points, through the origin (no signal, no forecast): loss ≈ a·raw_loss (+ b·disturbance);
    neg-flip rate ≈ flip_a·raw_flips (+ flip_b·disagreement); terms the form leaves out get 0."""
    f = [c["forecast"] for c in cells]
    x = np.array([[100 * g["raw_loss"]] + ([g["subspace_disturbance"]] if form.disturbance else []) for g in f])
    (a, *b), *_ = np.linalg.lstsq(x, np.array([100 * c["loss"] for c in cells]), rcond=None)
    fx = np.array(
        [[100 * g["raw_neg_flip_rate"]] + ([100 * g["disagreement"]] if form.disagreement else []) for g in f]
    )
    (fa, *fb), *_ = np.linalg.lstsq(fx, np.array([100 * c["neg_flip_rate"] for c in cells]), rcond=None)
    return float(a), float(b[0]) if b else 0.0, float(fa), float(fb[0]) if fb else 0.0


def _map(cells: list[Cell], form: Form = FORM) -> Calibration:
    a, b, fa, fb = _coefficients(cells, form)
    return Calibration(a, b, 0.0, fa, fb, 0.0, None, f"fitted on {len(cells)} cells")


def predict(cal: Calibration, c: Cell) -> tuple[float, float]:
    """(loss, negative-flip rate) in points for one cell, from its raw signals alone."""
    f = c["forecast"]
    loss = cal.loss(100 * f["raw_loss"], f["subspace_disturbance"])
    return loss, cal.flips(100 * f["raw_neg_flip_rate"], 100 * f["disagreement"])


@dataclass(frozen=True)
class Prediction:
    """One held-out cell's forecast, in points; `half` is its 95% interval's half-width (None where the
    training cells were too few to give out-of-sample residuals)."""

    cell: Cell
    fold: str
    loss: float
    flips: float
    half: float | None = None

    @property
    def residual(self) -> float:
        return self.loss - 100 * self.cell["loss"]

    @property
    def covered(self) -> bool | None:
        return None if self.half is None else abs(self.residual) <= self.half


MIN_TRAIN = 2  # cells a fold's fit needs: two coefficients


def held_out(cells: list[Cell], protocol: Protocol, form: Form = FORM) -> list[Prediction]:
    """Every cell some fold predicts, from a map fitted without its patch (and without its task, family or
    level, as the protocol says)."""
    out = []
    for fold in protocol(cells):
        if len(fold.train) >= MIN_TRAIN:
            cal = _map(fold.train, form)
            out += [Prediction(c, fold.held, *predict(cal, c)) for c in fold.test]
    return out


def with_intervals(preds: list[Prediction]) -> list[Prediction]:
    """Each fold's 95% interval: ± 1.96 × the RMS of the OTHER folds' held-out residuals (every one out of
    sample for its own cell; the held-out fold's measured values never set its own width, though its cells were
    in the fits that made the other folds' residuals)."""
    out = []
    for p in preds:
        others = [q.residual for q in preds if q.fold != p.fold]
        out.append(replace(p, half=Z95 * rms(others) if len(others) >= 2 else None))
    return out


def nested_intervals(cells: list[Cell], protocol: Protocol, preds: list[Prediction]) -> list[Prediction]:
    """The strict variant: each fold's width from the same protocol run inside its training cells alone, so the
    held-out cells touch neither centre nor width. With few groups the inner fits see one task or family
    each and the widths blow up; reported beside the headline coverage, not instead of it."""
    half = {}
    for fold in protocol(cells):
        inner = [q.residual for q in held_out(fold.train, protocol)]
        half[fold.held] = Z95 * rms(inner) if len(inner) >= 2 else None
    return [replace(p, half=half.get(p.fold)) for p in preds]


def rms(xs: list[float]) -> float:
    """Root mean square: the spread of out-of-sample residuals around 0 (their bias counts as error)."""
    return math.sqrt(sum(x * x for x in xs) / len(xs))


def figures(preds: list[Prediction]) -> dict[str, Any]:
    """The figures over held-out predictions: Spearman ρ and MAE of the loss, MAE of the negative-flip rate,
    and the share inside their 95% interval."""
    if not preds:
        none = dict.fromkeys(("spearman_loss", "mae_neg_flip_rate_points", "mae_loss_points", "interval_coverage"))
        return none | {"cells": 0, "interval_cells": 0, "interval_half_width_points": None}
    loss = [100 * p.cell["loss"] for p in preds]
    nfr = [100 * p.cell["neg_flip_rate"] for p in preds]
    inside = [p.covered for p in preds if p.covered is not None]
    return {
        "spearman_loss": spearman([p.loss for p in preds], loss),
        "mae_neg_flip_rate_points": float(np.mean(np.abs(np.subtract([p.flips for p in preds], nfr)))),
        "mae_loss_points": float(np.mean(np.abs(np.subtract([p.loss for p in preds], loss)))),
        "cells": len(preds),
        "interval_coverage": sum(inside) / len(inside) if inside else None,
        "interval_cells": len(inside),
        "interval_half_width_points": _median([p.half for p in preds if p.half is not None]),
    }


def _median(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def _oos_protocol(cells: list[Cell]) -> tuple[Protocol, str]:
    """The out-of-sample protocol the cells allow: by task where there are ≥ 2, else by level (grouped)."""
    if len({c["task"] for c in cells}) >= 2:
        return task_folds, "leave one task out"
    return level_folds, "leave one level out" + (", grouped by patch" if grouped_by_patch(cells) else "")


def fit(cells: list[Cell]) -> Calibration:
    """The calibration `forecast` ships: fitted on every cell but the t = 0 controls (which add nothing to a fit
    through the origin but would shrink its residuals); its residual sd is the RMS of out-of-sample residuals
    (leave one task out where there are ≥ 2 tasks), so the interval it gives is one for an unseen task."""
    used = [c for c in cells if not is_control(c)]
    if len(used) < MIN_TRAIN:
        raise PortLLMError(f"a calibration needs ≥ {MIN_TRAIN} cells off the t = 0 control; got {len(used)}")
    a, b, fa, fb = _coefficients(used)
    protocol, name = _oos_protocol(used)
    resid = [p.residual for p in held_out(used, protocol)]
    sd = rms(resid) if len(resid) >= 2 else None
    how = f"residual sd out of sample ({name}, {len(resid)} cells)" if sd is not None else "no out-of-sample sd"
    src = f"fitted on {len(used)} sweep cells ({len(cells) - len(used)} t = 0 controls left out); {how}"
    return Calibration(a, b, 0.0, fa, fb, 0.0, sd, src)


def fit_families(cells: list[Cell], families: dict[str, str]) -> Calibration:
    """The pooled calibration (every cell but the controls, of every family) with, in `.families`, one fitted on
    each base family's cells alone (its residual sd out of sample within the family, as `fit` does): a family
    fitted on its own bases can differ from the pool, and `forecast` should use the one it was validated on.
    `families` maps a cell's "family" (the base name its sweep was given) to its model family (models.family_of);
    base names of one model family are fitted together. A family with < 2 cells off the control gets no fit of
    its own, and the pooled source says so. With one model family the pooled fit names it as its `family`."""
    if unknown := sorted({str(c.get("family")) for c in cells if c.get("family") not in families}):
        raise PortLLMError(f"cells of {', '.join(unknown)} have no model family; pass it in `families`")
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(families[c["family"]], []).append(c)
    pooled = fit(cells)
    count = {f: sum(not is_control(c) for c in cs) for f, cs in groups.items()}
    own = {f: replace(fit(cs), family=f, cells=count[f]) for f, cs in groups.items() if count[f] >= MIN_TRAIN}
    if len(groups) == 1:
        return replace(pooled, family=next(iter(groups)), cells=sum(count.values()), families=own)
    src = f"{pooled.source}; pooled over {len(groups)} base families: " + "; ".join(
        f"{f} ({n} cells)" for f, n in count.items()
    )
    if short := [f for f in groups if f not in own]:
        src += f"; too few cells for a fit of its own: {', '.join(short)}"
    return replace(pooled, family=None, cells=sum(count.values()), source=src, families=own)


def _protocol(cells: list[Cell], protocol: Protocol, what: str, groups: set, text: str) -> dict[str, Any]:
    """One protocol's figures, or null figures and the reason where the cells have < 2 groups to leave out."""
    if len(groups) < 2:
        reason = f"one {what} ({', '.join(map(str, sorted(groups, key=str)))}) in the cells: nothing to leave out"
        return figures([]) | {"reason": reason, "protocol": text}
    preds = held_out(cells, protocol)
    strict = figures(nested_intervals(cells, protocol, preds))
    return figures(with_intervals(preds)) | {
        "interval_coverage_nested": strict["interval_coverage"],
        "interval_half_width_nested_points": strict["interval_half_width_points"],
        "protocol": text,
    }


def form_figures(used: list[Cell], form: Form) -> dict[str, Any]:
    """One model form's out-of-sample figures under each protocol (None where there is < 2 groups to leave out):
    the shipped form's beside the others', so the choice between them is visible."""
    out: dict[str, Any] = {}
    for key, protocol, group in (
        ("leave_one_task_out", task_folds, "task"),
        ("leave_one_family_out", family_folds, "family"),
        ("leave_one_level_out", level_folds, "level"),
    ):
        ok = len({c[group] for c in used}) >= 2
        f = figures(with_intervals(held_out(used, protocol, form))) if ok else figures([])
        out[key] = {k: f[k] for k in ("spearman_loss", "mae_loss_points", "mae_neg_flip_rate_points", "cells")}
        out[key]["interval_coverage"] = f["interval_coverage"]
    return out


def validate(cells: list[Cell]) -> dict[str, Any]:
    """Leave one task out (the headline; fills each cell's forecast and interval), leave one family out and
    leave one level out grouped by patch, all without the t = 0 controls; goals and whether each is met."""
    if missing := [c for c in cells if "family" not in c]:
        raise PortLLMError(f"{len(missing)} cells name no 'family' (the base family their patch was made on)")
    used = [c for c in cells if not is_control(c)]
    tasks, families = {c["task"] for c in used}, {c["family"] for c in used}
    grouped = grouped_by_patch(used)
    v: dict[str, Any] = {
        "controls": len(cells) - len(used),
        "leave_one_task_out": _protocol(
            used, task_folds, "task", tasks, "fitted on the other tasks' cells, predicts the held-out task's cells"
        )
        | {"tasks": len(tasks)},
        "leave_one_family_out": _protocol(
            used,
            family_folds,
            "family",
            families,
            "fitted on the other base families' cells, predicts the held-out family's",
        )
        | {"families": sorted(families, key=str)},
        "leave_one_level_out": _protocol(
            used,
            level_folds,
            "level",
            {c["level"] for c in used},
            "held out: one drift level of one seed; fitted on the other levels of the other patches"
            if grouped
            else "held out: one drift level; fitted on the other levels (one seed: patches are on both sides)",
        )
        | {"grouped_by_patch": grouped},
        "signals_inputs": sorted({str(c.get("signals_inputs", "not recorded")) for c in cells}),
        "form": FORM.name,
        "forms": {name: form_figures(used, form) for name, form in FORMS.items()},
    }
    head = "leave_one_task_out" if len(tasks) >= 2 else "leave_one_level_out"
    h = v[head]
    v |= {k: h[k] for k in ("spearman_loss", "mae_neg_flip_rate_points", "mae_loss_points", "cells")}
    v |= {"headline": head, "interval_coverage": h.get("interval_coverage")}
    v |= {"goal": GOALS, "met": _met(v)}
    v["protocol"] = (
        f"{head.replace('_', ' ')} (headline); {v['controls']} t = 0 controls left out of every figure; 95% "
        "intervals ± 1.96 × the RMS of the other folds' out-of-sample residuals"
    )
    _fill(cells, used, head)
    return v


def _met(v: dict[str, Any]) -> dict[str, bool | None]:
    """Each goal: True/False, or None where it could not be measured (e.g. one family)."""

    def at_least(x: float | None, goal: float) -> bool | None:
        return None if x is None else x >= goal

    def at_most(x: float | None, goal: float) -> bool | None:
        return None if x is None else x <= goal

    t, f, g = v["leave_one_task_out"], v["leave_one_family_out"], GOALS["leave_one_task_out"]
    cov, (lo, hi) = v["interval_coverage"], GOALS["interval_coverage"]
    return {
        "leave_one_task_out.spearman_loss": at_least(t["spearman_loss"], g["spearman_loss"]),
        "leave_one_task_out.mae_neg_flip_rate_points": at_most(
            t["mae_neg_flip_rate_points"], g["mae_neg_flip_rate_points"]
        ),
        "leave_one_task_out.mae_loss_points": at_most(t["mae_loss_points"], g["mae_loss_points"]),
        "leave_one_family_out.spearman_loss": at_least(
            f["spearman_loss"], GOALS["leave_one_family_out"]["spearman_loss"]
        ),
        "interval_coverage": None if cov is None else lo <= cov <= hi,
    }


def _fill(cells: list[Cell], used: list[Cell], head: str) -> None:
    """Each cell's forecast from the headline protocol (out of sample, with its interval); the controls get the
    map fitted on every other cell (0 by construction) and are marked as not validated."""
    protocol = task_folds if head == "leave_one_task_out" else level_folds
    for p in with_intervals(held_out(used, protocol)):
        iv = None if p.half is None else [(p.loss - p.half) / 100, (p.loss + p.half) / 100]
        p.cell["forecast"] |= {"loss": p.loss / 100, "neg_flip_rate": p.flips / 100, "loss_interval": iv}
        p.cell["forecast"]["held_out_by"] = f"{head} ({p.fold})"
    if len(used) >= MIN_TRAIN:
        full = _map(used)
        for c in cells:
            if is_control(c):
                loss, flips = predict(full, c)
                c["forecast"] |= {"loss": loss / 100, "neg_flip_rate": flips / 100, "loss_interval": None}
                c["forecast"]["held_out_by"] = "control (θ' = θ): not validated"
