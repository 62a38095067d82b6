"""What a task is once loaded: the frozen records the evaluator, trainer and CLI consume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("mc", "gen")
DATA_VAR = "${PORTLLM_DATA}/"  # how a user's task file names data in the data directory (--data-dir)
# metric -> how tables print it; exact_match is GSM8K's flexible extraction (the engine's headline number)
METRICS = {"acc": "acc", "acc_norm": "acc_norm", "exact_match": "exact match (flexible)"}
METRIC_KINDS = {"acc": "mc", "acc_norm": "mc", "exact_match": "gen"}
# what a generation task file may also record per example (`generation.metrics`), each against its reference
# completion (`target`): mean per-token log-likelihood, exact match, chrF (eval/metrics.py); `compare` pairs them
GEN_METRICS = ("loglik", "exact_match", "chrf")


@dataclass(frozen=True)
class Example:
    """One evaluation item: per-choice (context, continuation) pairs, or a generation prompt."""

    idx: int
    gold: Any  # index of the right choice, or the reference answer string for generation
    contexts: tuple[str, ...] = ()  # one per choice (multiple-choice); identical except WinoGrande
    continuations: tuple[str, ...] = ()
    prompt: str = ""  # generation tasks
    target: str = ""  # text a fine-tune learns to produce after the prompt


@dataclass(frozen=True)
class Split:
    file: str  # relative to the data dir (a user's task file: to its folder, or ${PORTLLM_DATA}/...); "a+b" joins
    rows: tuple[int | None, int | None] = (None, None)  # [start, stop) slice of the rows in file order
    note: str = ""


@dataclass(frozen=True)
class Hub:
    """Where the Hugging Face hub keeps the task, and how its rows differ from the local files."""

    path: str
    config: str | None
    splits: dict[str, str]  # {"train": hub split, "eval": hub split}
    fields: dict[str, Any] = field(default_factory=dict)  # "a.b": source path, or {"records": {key: path}}
    rename: dict[str, str] = field(default_factory=dict)  # hub field -> local field
    cast: dict[str, str] = field(default_factory=dict)  # field -> "str" | "int"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "mc" (log-likelihood multiple choice) or "gen" (greedy generation)
    metric: str  # "acc", "acc_norm" or "exact_match"
    train: Split
    eval: Split
    reader: Callable[[Path], list[dict[str, Any]]]
    make: Callable[[int, dict[str, Any]], Example]
    hub: Hub | None = None
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    paper: bool = False  # one of the seven tasks of the PortLLM paper
    source: str = ""  # the definition file it was loaded from
    root: Path | None = None  # a user's task file: its folder, which its data paths are relative to
    sha256: str = ""  # a user's task file: the file's hash, so caches never take two files of one name for one
    gen_metrics: tuple[str, ...] = ()  # GEN_METRICS a generation task records per example (generation.metrics)

    @property
    def identity(self) -> str:
        """What caches and manifests key the task by: the name, plus the file's hash for a user's task file
        (a shipped task's key stays its name, so existing caches still resume)."""
        return f"{self.name}@sha256:{self.sha256}" if self.sha256 else self.name
