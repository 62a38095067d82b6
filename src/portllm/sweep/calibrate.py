"""Turning the forecast's raw signals into points, and checking it on cells it did not see.

The raw unlabeled estimate (θ+Δθ's own probabilities as the belief about the right answer) is
mapped to the measured loss by least squares on a sweep's cells, together with the weight signal
(drift inside the patch subspace); the negative-flip rate, from the raw flip estimate and the plain
disagreement between θ+Δθ and θ'+Δθ. Validation leaves one drift level out at a time: the map is
fitted on the other levels and predicts the held-out level's cells, so every validation figure is
out of sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..forecast import Calibration


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


def fit(cells: list[dict[str, Any]]) -> Calibration:
    """Least squares in points, through the origin (no signal, no forecast: the zero-drift control):
    loss ≈ a·raw_loss + b·disturbance; neg-flip rate ≈ flip_a·raw_flips + flip_b·disagreement.

    The disagreement term carries what the raw flip estimate misses where θ+Δθ is unsure of its answers
    (four-choice ARC-Easy: raw flips ~0.6x the measured ones; binary SST-2: ~1.1x)."""
    raw = np.array([100 * c["forecast"]["raw_loss"] for c in cells])
    dist = np.array([c["forecast"]["subspace_disturbance"] for c in cells])
    y = np.array([100 * c["loss"] for c in cells])
    x = np.column_stack([raw, dist])
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    fr = np.array([100 * c["forecast"]["raw_neg_flip_rate"] for c in cells])
    dis = np.array([100 * c["forecast"]["disagreement"] for c in cells])
    fy = np.array([100 * c["neg_flip_rate"] for c in cells])
    (fa, fb), *_ = np.linalg.lstsq(np.column_stack([fr, dis]), fy, rcond=None)
    resid = y - x @ np.array([a, b])
    sd = float(resid.std(ddof=min(2, len(cells) - 1))) if len(cells) > 2 else None
    return Calibration(float(a), float(b), 0.0, float(fa), float(fb), 0.0, sd, f"fitted on {len(cells)} sweep cells")


def _held_out(cells: list[dict[str, Any]], key: str, fill: bool) -> dict[str, Any]:
    """Fit on the cells of every other value of `key`, predict the held-out value's cells."""
    pred, meas, fpred, fmeas, used = [], [], [], [], 0
    for held in sorted({c[key] for c in cells}):
        train = [c for c in cells if c[key] != held]
        test = [c for c in cells if c[key] == held]
        if len({c["level"] for c in train}) < 2:
            continue
        f = fit(train)
        for c in test:
            p = f.loss(100 * c["forecast"]["raw_loss"], c["forecast"]["subspace_disturbance"])
            q = f.flips(100 * c["forecast"]["raw_neg_flip_rate"], 100 * c["forecast"]["disagreement"])
            if fill:
                c["forecast"]["loss"] = p / 100
                c["forecast"]["neg_flip_rate"] = q / 100
            pred.append(p)
            meas.append(100 * c["loss"])
            fpred.append(q)
            fmeas.append(100 * c["neg_flip_rate"])
            used += 1
    mae = float(np.mean(np.abs(np.array(fpred) - np.array(fmeas)))) if fpred else None
    rho = spearman(pred, meas)
    return {
        "spearman_loss": rho,
        "mae_neg_flip_rate_points": mae,
        "mae_loss_points": float(np.mean(np.abs(np.array(pred) - np.array(meas)))) if pred else None,
        "cells": used,
    }


def validate(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Leave one drift level out (the headline; fills each cell's forecast) and, with ≥ 2 tasks, leave one
    task out (a calibration carried to a task it never saw, as a user's own patch is)."""
    v = _held_out(cells, "level", fill=True)
    rho, mae = v["spearman_loss"], v["mae_neg_flip_rate_points"]
    v |= {
        "protocol": "leave one drift level out: the map from raw signals to points is fitted on the other "
        "levels' cells and predicts the held-out level's cells; figures are over all held-out predictions",
        "goal": {"spearman_loss": 0.8, "mae_neg_flip_rate_points": 1.5},
        "met": {
            "spearman_loss": rho is not None and rho >= 0.8,
            "mae_neg_flip_rate_points": mae is not None and mae <= 1.5,
        },
    }
    tasks = {c["task"] for c in cells}
    if len(tasks) >= 2:
        v["leave_one_task_out"] = _held_out(cells, "task", fill=False) | {
            "tasks": len(tasks),
            "protocol": "fitted on the other tasks' cells, predicts the held-out task's cells",
        }
    return v
