"""The reproduction's result as data: accuracy per task and variant, flips, and what each step cost.

`ReproduceReport.to_dict()` is report.json (and `portllm reproduce --json`); `from_dict` reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..evaluate import TaskFlips
from .profiles import VARIANTS


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
    """One task's row of Table 2: the score of each variant (VARIANTS) and its bootstrap stderr."""

    scores: dict[str, float]
    metric: str
    n: int
    stderr: dict[str, float]
    ported_minus_retuned: float
    ported_minus_evolved: float

    def to_dict(self) -> dict[str, Any]:
        return {v: self.scores[v] for v in VARIANTS} | {
            "metric": self.metric,
            "n": self.n,
            "stderr": self.stderr,
            "ported_minus_retuned": self.ported_minus_retuned,
            "ported_minus_evolved": self.ported_minus_evolved,
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
        )


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
    average: dict[str, float | None]  # each variant's mean over tasks, and ported_minus_retuned's
    machine: dict[str, Any]
    timings_s: dict[str, float]

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
        )
