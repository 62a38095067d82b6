"""The reproduction's result as data: accuracy per task and variant, flips, paired comparisons, and
what each step cost.

`ReproduceReport.to_dict()` is report.json (and `portllm reproduce --json`); `from_dict` reads one back,
including reports written before the paired statistics (their new fields are None or empty).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..eval import DEFAULT_MARGIN, TaskFlips
from ..stats import Paired, wilson
from .profiles import VARIANTS

# the paired comparisons of each task: name -> (A, B); each is B − A on the same examples
COMPARISONS = {
    "ported_minus_retuned": ("evolved+retuned", "evolved+patch"),  # the paper's claim: porting ≈ re-tuning
    "ported_minus_patched": ("base+patch", "evolved+patch"),  # what the base update cost the patch
    "patched_minus_base": ("base", "base+patch"),  # what the patch learned (see `learned`)
}


@dataclass
class Cost:
    """Wall time and peak RSS of a step's own process, and how many parameters it trained."""

    wall_s: float | None
    peak_rss_mb: float | None
    trainable_params: int

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "peak_rss_mb": self.peak_rss_mb, "trainable_params": self.trainable_params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cost:
        return cls(d["wall_s"], d["peak_rss_mb"], d["trainable_params"])


@dataclass
class RetuneCost(Cost):
    """Re-tuning's cost, with what the training run did."""

    peak_gpu_mb: float | None = None
    steps: int = 0
    examples_seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_gpu_mb": self.peak_gpu_mb,
            "trainable_params": self.trainable_params,
            "steps": self.steps,
            "examples_seen": self.examples_seen,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetuneCost:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass
class TaskCost:
    port: Cost
    retune: RetuneCost

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port.to_dict(), "retune": self.retune.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskCost:
        return cls(Cost.from_dict(d["port"]), RetuneCost.from_dict(d["retune"]))


@dataclass
class Efficiency:
    """Porting against re-tuning over all tasks: mean time, max memory."""

    port: Cost
    retune: Cost
    memory_retune_over_port: float | None
    time_retune_over_port: float | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port.to_dict(),
            "retune": self.retune.to_dict(),
            "ratios": {
                "memory_retune_over_port": self.memory_retune_over_port,
                "time_retune_over_port": self.time_retune_over_port,
            },
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Efficiency:
        r = d["ratios"]
        return cls(
            Cost.from_dict(d["port"]),
            Cost.from_dict(d["retune"]),
            r["memory_retune_over_port"],
            r["time_retune_over_port"],
            d["note"],
        )


@dataclass
class TaskScores:
    """One task's row of Table 2: the score of each variant (VARIANTS), its bootstrap stderr and Wilson
    95% interval, and the majority-class baseline of the slice (None for generation tasks)."""

    scores: dict[str, float]
    metric: str
    n: int
    stderr: dict[str, float]
    ported_minus_retuned: float
    ported_minus_evolved: float
    majority: float | None = None
    ci: dict[str, list[float]] | None = None  # variant -> [low, high]; None in older reports

    def interval(self, v: str) -> tuple[float, float]:
        """Variant v's Wilson 95% interval; for older reports, from the score (k/n) itself."""
        if self.ci and v in self.ci:
            lo, hi = self.ci[v]
            return lo, hi
        return wilson(round(self.scores[v] * self.n), self.n)

    def to_dict(self) -> dict[str, Any]:
        return {v: self.scores[v] for v in VARIANTS} | {
            "metric": self.metric,
            "n": self.n,
            "stderr": self.stderr,
            "ported_minus_retuned": self.ported_minus_retuned,
            "ported_minus_evolved": self.ported_minus_evolved,
            "majority": self.majority,
            "ci": self.ci,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskScores:
        return cls(
            {v: d[v] for v in VARIANTS},
            d["metric"],
            d["n"],
            d["stderr"],
            d["ported_minus_retuned"],
            d["ported_minus_evolved"],
            d.get("majority"),
            d.get("ci"),
        )


def paired_to_dict(p: Paired, a: str, b: str, margin: float) -> dict[str, Any]:
    """A paired comparison as report.json holds it: the statistics, which variants, and the verdict."""
    return {"a": a, "b": b} | p.to_dict() | {"verdict": p.verdict(margin)}


def paired_from_dict(d: dict[str, Any]) -> Paired:
    return Paired(**{f.name: d[f.name] for f in fields(Paired) if f.name in d})


@dataclass
class EvolvedBase:
    """θ': where it is, what it is, how it was made and how far it moved from θ."""

    path: str
    fingerprint: str
    corpus: str
    steps: int
    mode: str
    drift: dict[str, float]
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvolvedBase:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class ReproduceReport:
    profile: str
    base: dict[str, str]  # name, fingerprint
    evolved: EvolvedBase
    settings: dict[str, Any]  # train recipe, eval dtype, notes on the eval subsets
    tasks: dict[str, TaskScores]
    efficiency: Efficiency
    flips: dict[str, TaskFlips]  # θ' + Δθ against θ + Δθ
    per_task_cost: dict[str, TaskCost]
    average: dict[str, Any]  # each variant's mean over tasks, and ported_minus_retuned's (with its CI)
    machine: dict[str, Any]
    timings_s: dict[str, float]
    # task -> COMPARISONS name -> paired statistics; empty in older reports
    paired: dict[str, dict[str, Paired]] = field(default_factory=dict)
    learned: list[str] | None = None  # tasks whose patch learned (run.learned); None in older reports
    average_learned: dict[str, Any] | None = None  # `average` over the learned tasks only: the headline
    margin: float = DEFAULT_MARGIN  # verdicts: "no difference" only within ±margin

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "base": self.base,
            "evolved": self.evolved.to_dict(),
            "settings": self.settings,
            "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
            "efficiency": self.efficiency.to_dict(),
            "flips": {k: v.to_dict() for k, v in self.flips.items()},
            "per_task_cost": {k: v.to_dict() for k, v in self.per_task_cost.items()},
            "average": self.average,
            "machine": self.machine,
            "timings_s": self.timings_s,
            "paired": {
                t: {k: paired_to_dict(p, *COMPARISONS[k], self.margin) for k, p in cmp.items()}
                for t, cmp in self.paired.items()
            },
            "learned": self.learned,
            "average_learned": self.average_learned,
            "margin": self.margin,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReproduceReport:
        return cls(
            d["profile"],
            d["base"],
            EvolvedBase.from_dict(d["evolved"]),
            d["settings"],
            {k: TaskScores.from_dict(v) for k, v in d["tasks"].items()},
            Efficiency.from_dict(d["efficiency"]),
            {k: TaskFlips.from_dict(v) for k, v in d["flips"].items()},
            {k: TaskCost.from_dict(v) for k, v in d["per_task_cost"].items()},
            d["average"],
            d["machine"],
            d["timings_s"],
            {t: {k: paired_from_dict(p) for k, p in cmp.items()} for t, cmp in d.get("paired", {}).items()},
            d.get("learned"),
            d.get("average_learned"),
            d.get("margin", DEFAULT_MARGIN),
        )
