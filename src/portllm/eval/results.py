"""What an evaluation produces and how it is stored: TaskRun (one task scored, with its records),
TaskResult (a row of results.json), EvalResult (results.json), and reading a run directory back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import PortLLMError
from .lm import LM


@dataclass
class TaskResult:
    """One task's score for one model: a row of results.json."""

    task: str
    metric: str
    value: float
    stderr: float
    n: int
    model: str
    patch: str | None
    patch_fingerprint: str | None
    dtype: str
    time_s: float
    tokens: int
    tokens_per_s: float | None
    extra: dict[str, float] = field(default_factory=dict)  # acc and acc_norm, or GSM8K's strict/flexible match
    ci_low: float | None = None  # Wilson 95% interval of value (None in results.json files older than it)
    ci_high: float | None = None
    majority: float | None = None  # majority-class baseline of the slice; None for generation tasks

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "value": self.value,
            "stderr": self.stderr,
            "n": self.n,
            "model": self.model,
            "patch": self.patch,
            "patch_fingerprint": self.patch_fingerprint,
            "dtype": self.dtype,
            "time_s": self.time_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "majority": self.majority,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: d.get(k) for k in known}, extra={k: v for k, v in d.items() if k not in known})


@dataclass
class EvalResult:
    """A model's scores on a set of tasks: what results.json holds."""

    model: str
    patch: str | None
    patch_fingerprint: str | None
    dtype: str
    limit: int | None
    batch_size: int
    max_batch_tokens: int
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tasks"}
        return d | {"tasks": {name: t.to_dict() for name, t in self.tasks.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        known = {f.name for f in fields(cls)} - {"tasks"}
        tasks = {name: TaskResult.from_dict(t) for name, t in d.get("tasks", {}).items()}
        return cls(**{k: d.get(k) for k in known}, tasks=tasks)

    @classmethod
    def read(cls, run_dir: str | Path) -> EvalResult:
        """The results.json of an eval run directory."""
        return cls.from_dict(read_run(run_dir, samples=False)[0])


@dataclass
class TaskRun:
    """One task scored: the per-example records (samples_<task>.jsonl) and the totals."""

    task: str
    metric: str
    value: float
    stderr: float
    n: int
    records: list[dict[str, Any]]
    time_s: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)
    ci_low: float | None = None
    ci_high: float | None = None
    majority: float | None = None

    def result(self, lm: LM) -> TaskResult:
        return TaskResult(
            self.task,
            self.metric,
            self.value,
            self.stderr,
            self.n,
            lm.spec,
            lm.patch,
            lm.patch_fingerprint,
            lm.dtype,
            round(self.time_s, 2),
            self.tokens,
            round(self.tokens / self.time_s, 1) if self.time_s else None,
            dict(self.extra),
            self.ci_low,
            self.ci_high,
            self.majority,
        )


def read_run(d: str | Path, samples: bool = True) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """An eval run directory as written by `evaluate`: results.json, and each task's records."""
    d = Path(d)
    f = d / "results.json"
    if not f.is_file():
        raise PortLLMError(f"{d} is not an eval run (no results.json); make one with `portllm eval --out {d}`")
    try:
        res = json.loads(f.read_text())
    except ValueError as e:
        raise PortLLMError(f"{f}: not valid JSON ({e})") from None
    records = {}
    for t in res.get("tasks", {}) if samples else ():
        sf = d / f"samples_{t}.jsonl"
        if not sf.is_file():
            raise PortLLMError(f"{d}: samples_{t}.jsonl is missing")
        rows = []
        for n, line in enumerate(sf.read_text().splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise PortLLMError(f"{sf}:{n}: malformed JSON line") from None
        records[t] = rows
    return res, records
