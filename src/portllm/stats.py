"""Honest statistics for comparing models on the same examples.

Two variants scored on the same examples are compared *paired*: the exact McNemar test on the
discordant pairs and a paired bootstrap interval for the accuracy difference. A single accuracy
gets a Wilson interval (never "0.0 ± 0.0"). "No difference" is claimed only when the whole
interval lies inside the margin the caller names.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (sensible at 0 and n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo, hi = max(0.0, mid - half), min(1.0, mid + half)
    return (0.0 if k == 0 else lo, 1.0 if k == n else hi)  # exact ends where rounding would miss them


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs (b one way, c the other) against Binomial(b+c, ½)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], iters: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """mean(b) − mean(a) and its percentile interval, resampling examples (pairs stay together)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("paired scores must be two equally long 1-D sequences")
    n = len(x)
    d = y - x
    if n == 0:
        return (0.0, 0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    for start in range(0, iters, 1000):  # bounded memory for large n
        m = min(1000, iters - start)
        idx = rng.integers(0, n, size=(m, n))
        means[start : start + m] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(d.mean()), float(lo), float(hi))


def majority(golds: Sequence[Any]) -> tuple[Any, float]:
    """The most frequent gold label and the accuracy of always answering it."""
    if not golds:
        return (None, 0.0)
    label, count = Counter(golds).most_common(1)[0]
    return (label, count / len(golds))


@dataclass(frozen=True)
class Paired:
    """A compared with B on the same n examples (correctness 0/1 per example)."""

    n: int
    acc_a: float
    acc_b: float
    diff: float  # acc_b − acc_a
    ci_low: float
    ci_high: float
    negative_flips: int  # right in A, wrong in B
    positive_flips: int  # wrong in A, right in B
    mcnemar_p: float
    level: float = 0.95

    def within(self, margin: float) -> bool:
        """True only if the whole interval lies inside ±margin: the honest 'no difference'."""
        return -margin < self.ci_low and self.ci_high < margin

    def verdict(self, margin: float = 0.01) -> str:
        if self.within(margin):
            return f"no difference beyond ±{100 * margin:g} points"
        if self.ci_low > 0:
            return "B better"
        if self.ci_high < 0:
            return "B worse"
        return "inconclusive"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(a: Sequence[float], b: Sequence[float], iters: int = 10_000, level: float = 0.95, seed: int = 0) -> Paired:
    """Compare two variants' per-example correctness on the same examples, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same examples: {len(a)} vs {len(b)}")
    neg = sum(1 for x, y in zip(a, b) if x and not y)
    pos = sum(1 for x, y in zip(a, b) if y and not x)
    diff, lo, hi = paired_bootstrap(a, b, iters, level, seed)
    n = len(a)
    return Paired(
        n=n,
        acc_a=sum(a) / n if n else 0.0,
        acc_b=sum(b) / n if n else 0.0,
        diff=diff,
        ci_low=lo,
        ci_high=hi,
        negative_flips=neg,
        positive_flips=pos,
        mcnemar_p=mcnemar_exact(neg, pos),
        level=level,
    )
