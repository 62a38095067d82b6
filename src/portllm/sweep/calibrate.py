"""Turning the forecast's raw signals into points, and checking it on cells it did not see.

The raw unlabeled estimate (θ+Δθ's own probabilities as the belief about the right answer) is
mapped to the measured loss by least squares on a sweep's cells, together with the weight signal
(drift inside the patch subspace). Validation leaves one drift level out at a time: the map is
fitted on the other levels and predicts the held-out level's cells, so every validation figure is
out of sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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


@dataclass(frozen=True)
class Fit:
    a: float
    b: float
    c: float
    flip_a: float
    flip_c: float
    residual_sd_points: float | None

    def loss(self, raw: float, disturbance: float) -> float:
        return self.a * raw + self.b * disturbance + self.c

    def flips(self, raw_flips: float) -> float:
        return max(0.0, self.flip_a * raw_flips + self.flip_c)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit(cells: list[dict[str, Any]]) -> Fit:
    """Least squares in points: loss ≈ a·raw + b·disturbance + c; neg-flip rate ≈ flip_a·raw_flips + flip_c."""
    raw = np.array([100 * c["forecast"]["raw_loss"] for c in cells])
    dist = np.array([c["forecast"]["subspace_disturbance"] for c in cells])
    y = np.array([100 * c["loss"] for c in cells])
    x = np.column_stack([raw, dist, np.ones(len(cells))])
    (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    fr = np.array([100 * c["forecast"]["raw_neg_flip_rate"] for c in cells])
    fy = np.array([100 * c["neg_flip_rate"] for c in cells])
    (fa, fc), *_ = np.linalg.lstsq(np.column_stack([fr, np.ones(len(cells))]), fy, rcond=None)
    resid = y - x @ np.array([a, b, c])
    sd = float(resid.std(ddof=min(3, len(cells) - 1))) if len(cells) > 3 else None
    return Fit(float(a), float(b), float(c), float(fa), float(fc), sd)


def validate(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Leave one drift level out; returns the out-of-sample figures and fills each cell's forecast."""
    levels = sorted({c["level"] for c in cells})
    pred, meas, fpred, fmeas, used = [], [], [], [], 0
    for held in levels:
        train = [c for c in cells if c["level"] != held]
        test = [c for c in cells if c["level"] == held]
        if len({c["level"] for c in train}) < 2:
            continue
        f = fit(train)
        for c in test:
            p = f.loss(100 * c["forecast"]["raw_loss"], c["forecast"]["subspace_disturbance"])
            q = f.flips(100 * c["forecast"]["raw_neg_flip_rate"])
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
        "protocol": "leave one drift level out: the map from raw signals to points is fitted on the other "
        "levels' cells and predicts the held-out level's cells; figures are over all held-out predictions",
        "goal": {"spearman_loss": 0.8, "mae_neg_flip_rate_points": 1.5},
        "met": {
            "spearman_loss": rho is not None and rho >= 0.8,
            "mae_neg_flip_rate_points": mae is not None and mae <= 1.5,
        },
    }
