"""Two runs compared paired, example by example (stats.py): flips, B − A with a paired-bootstrap
interval, McNemar, and a verdict against a margin; for a generation task that records per-example
metrics (a task file's `generation.metrics`), each metric's B − A with its paired-bootstrap interval."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import PortLLMError
from ..stats import Paired, paired, paired_bootstrap
from ..tasks.schema import GEN_METRICS
from .results import read_run


def aligned_correct(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-example correctness (0/1) of two runs' records of one task on the examples they share, in idx order."""
    ra, rb = {r["idx"]: r for r in a}, {r["idx"]: r for r in b}
    common = sorted(set(ra) & set(rb))
    return [float(bool(ra[i]["correct"])) for i in common], [float(bool(rb[i]["correct"])) for i in common]


def paired_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> Paired:
    """Two runs' records of one task compared paired, on the examples they share (by idx): B − A with
    its paired-bootstrap 95% interval and the exact McNemar p-value. Scoring the same examples twice
    makes the difference far tighter than two separate intervals suggest, and honest where they overlap."""
    return paired(*aligned_correct(a, b))


DEFAULT_MARGIN = 0.01  # "no difference" means the whole interval lies within ±1 point


@dataclass(frozen=True)
class MetricDiff:
    """One per-example generation metric of two runs on the examples both recorded it for: the means, B − A
    and its paired-bootstrap 95% interval (loglik in nats/token, exact_match a fraction, chrf 0-100)."""

    n: int
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def metric_diffs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, MetricDiff]:
    """Each GEN_METRICS metric both runs recorded, paired by example (idx); {} for runs without them."""
    ra, rb = {r["idx"]: r for r in a}, {r["idx"]: r for r in b}
    common = sorted(set(ra) & set(rb))
    out = {}
    for m in GEN_METRICS:
        both = [i for i in common if ra[i].get(m) is not None and rb[i].get(m) is not None]
        if both:
            xa, xb = [float(ra[i][m]) for i in both], [float(rb[i][m]) for i in both]
            diff, lo, hi = paired_bootstrap(xa, xb)
            out[m] = MetricDiff(len(both), sum(xa) / len(xa), sum(xb) / len(xb), diff, lo, hi)
    return out


@dataclass
class TaskFlips:
    """How two runs' answers to the same examples differ. Negative flips: right in A, wrong in B (what an
    update broke); positive flips: the reverse. `diff` (acc_b − acc_a), its paired 95% interval and the
    McNemar p-value say whether the difference is more than noise; `verdict` reads them against `margin`."""

    n: int
    acc_a: float = 0.0
    acc_b: float = 0.0
    agreement: float = 0.0
    negative_flips: int = 0
    positive_flips: int = 0
    negative_flip_rate: float = 0.0
    positive_flip_rate: float = 0.0
    negative_flip_idx: list[Any] = field(default_factory=list)  # the first 50
    diff: float = 0.0
    ci_low: float = 0.0
    ci_high: float = 0.0
    mcnemar_p: float = 1.0
    margin: float = DEFAULT_MARGIN
    verdict: str = ""  # "" in reports older than the paired statistics
    metrics: dict[str, MetricDiff] = field(default_factory=dict)  # generation metrics both runs recorded

    def to_dict(self) -> dict[str, Any]:
        if not self.n:
            return {"n": 0}
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        return d | ({"metrics": {k: m.to_dict() for k, m in self.metrics.items()}} if self.metrics else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskFlips:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["metrics"] = {k: MetricDiff(**m) for k, m in d.get("metrics", {}).items()}
        return cls(**kw)


def flips(a: list[dict[str, Any]], b: list[dict[str, Any]], margin: float = DEFAULT_MARGIN) -> TaskFlips:
    """Compare two runs' records of one task on the examples they share."""
    ra, rb = {r["idx"]: r for r in a}, {r["idx"]: r for r in b}
    common = sorted(set(ra) & set(rb))
    n = len(common)
    if not n:
        return TaskFlips(0)
    neg = [i for i in common if ra[i]["correct"] and not rb[i]["correct"]]
    pos = [i for i in common if not ra[i]["correct"] and rb[i]["correct"]]
    agree = sum(1 for i in common if ra[i]["pred"] == rb[i]["pred"])
    p = paired_records(a, b)
    return TaskFlips(
        n=n,
        acc_a=sum(ra[i]["correct"] for i in common) / n,
        acc_b=sum(rb[i]["correct"] for i in common) / n,
        agreement=agree / n,
        negative_flips=len(neg),
        positive_flips=len(pos),
        negative_flip_rate=len(neg) / n,
        positive_flip_rate=len(pos) / n,
        negative_flip_idx=neg[:50],
        diff=p.diff,
        ci_low=p.ci_low,
        ci_high=p.ci_high,
        mcnemar_p=p.mcnemar_p,
        margin=margin,
        verdict=p.verdict(margin),
        metrics=metric_diffs(a, b),
    )


@dataclass
class RunRef:
    """Which run a comparison side is: its directory and what it scored."""

    dir: str
    model: str | None
    patch: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"dir": self.dir, "model": self.model, "patch": self.patch}


@dataclass
class CompareResult:
    a: RunRef
    b: RunRef
    tasks: dict[str, TaskFlips]
    margin: float = DEFAULT_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "tasks": {t: f.to_dict() for t, f in self.tasks.items()},
            "margin": self.margin,
        }


def compare(run_a: str | Path, run_b: str | Path, margin: float = DEFAULT_MARGIN) -> CompareResult:
    """Flips and paired statistics between two eval runs, per task they share; "no difference" only
    where the whole 95% interval of B − A lies within ±margin."""
    if not 0 < margin < 1:
        raise PortLLMError(f"margin {margin} must be a fraction between 0 and 1 (0.01 = 1 point)")
    ra, sa = read_run(run_a)
    rb, sb = read_run(run_b)
    shared = [t for t in sa if t in sb]
    if not shared:
        raise PortLLMError(f"{run_a} and {run_b} share no task")
    return CompareResult(
        RunRef(str(run_a), ra.get("model"), ra.get("patch")),
        RunRef(str(run_b), rb.get("model"), rb.get("patch")),
        {t: flips(sa[t], sb[t], margin) for t in shared},
        margin,
    )
