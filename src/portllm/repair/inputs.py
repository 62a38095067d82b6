"""What a repair learns from: unlabeled inputs, never labels.

Three sources, as a user has them:
- a task (a shipped name or a task file): its *train* split's inputs, so the eval split that later judges
  the repair is never seen. Multiple-choice tasks give their answer options (the distribution over them is
  what is distilled); generation tasks give prompts. The gold answers are loaded with the rows by the task
  reader but never read here.
- a file: plain text (`.txt`, one input per line) or the JSONL `train --data` reads (prompt/completion or
  chat messages). Only the prompts are used (a chat is cut before its last assistant turn); the
  completions are answers, and θ+Δθ writes its own.
- `self`: no data at all (Trans-LoRA's setting). θ+Δθ writes the inputs itself, sampled with a fixed seed,
  from nothing or from seed prompts (`self:FILE` or `self:TASK`, the task's train prompts: inputs only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PortLLMError
from ..sft import read_sft
from ..tasks import get_task, is_task_file, load_examples

SELF = "self"


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice input: per-choice (context, continuation) pairs; which one is right is not here."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]


@dataclass
class RepairInputs:
    """The unlabeled inputs of one repair, and what a manifest records of them (never their content)."""

    source: str  # the task's identity, the file's name, or "self[:seeds]"
    kind: str  # "choices" (answer options) or "text" (prompts that θ+Δθ continues, or its own samples)
    choices: list[ChoiceItem] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # text: prompts to continue; self: seed prompts
    metric: str = "acc"  # how a choice's log-likelihood is normalised (the task's metric)
    generated: bool = False  # self: θ+Δθ writes the inputs
    samples: int = 0  # self: how many sequences θ+Δθ writes

    @property
    def n(self) -> int:
        if self.generated:
            return self.samples
        return len(self.choices) if self.kind == "choices" else len(self.prompts)

    def sha256(self) -> str:
        """sha256 of the inputs as used (the seed prompts for `self`; the generated text is hashed later)."""
        body = [[list(c.contexts), list(c.continuations)] for c in self.choices] or self.prompts
        return hashlib.sha256(json.dumps([self.kind, body]).encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "n": self.n, "sha256": self.sha256()}


def read_inputs(spec: str, n: int, data: str | Path | None = None) -> RepairInputs:
    """The inputs `--inputs SPEC` names: a task, a task file, a text/JSONL file, or `self[:SEEDS]`."""
    if n < 1:
        raise PortLLMError("--n must be at least 1")
    if spec == SELF or spec.startswith(SELF + ":"):
        seeds = spec.split(":", 1)[1] if ":" in spec else ""
        prompts = _prompts(seeds, n, data) if seeds else []
        return RepairInputs(spec, "text", prompts=prompts, generated=True, samples=n)
    path = Path(spec)
    if path.is_file() and not is_task_file(path):
        return RepairInputs(path.name, "text", prompts=_file_prompts(path, n))
    task = get_task(spec)
    examples = load_examples(task, "train", data, n)
    if not examples:
        raise PortLLMError(f"{task.name} has no train-split inputs to repair on; pass a file or --inputs self")
    if task.kind == "mc":
        items = [ChoiceItem(tuple(e.contexts), tuple(e.continuations)) for e in examples]
        return RepairInputs(task.identity, "choices", choices=items, metric=task.metric)
    return RepairInputs(task.identity, "text", prompts=[e.prompt for e in examples])


def _prompts(spec: str, n: int, data: str | Path | None) -> list[str]:
    """Seed prompts for `self:SPEC`: a file's prompts or a task's rendered train inputs (answers left out)."""
    path = Path(spec)
    if path.is_file() and not is_task_file(path):
        return _file_prompts(path, n)
    task = get_task(spec)
    examples = load_examples(task, "train", data, n)
    return [e.contexts[0] if task.kind == "mc" else e.prompt for e in examples]


def _file_prompts(path: Path, n: int) -> list[str]:
    """A text file's non-empty lines, or a JSONL file's prompts (chats cut before their last assistant turn)."""
    if path.suffix.lower() in (".jsonl", ".json"):
        data = read_sft(path)
        out = []
        for row in data.rows[:n]:
            if "messages" in row:
                msgs = row["messages"]
                last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
                out.append(msgs[:last])
            else:
                out.append(row["prompt"])
        return out  # chats stay as message lists: the tokenizer's template renders them (distill.render)
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()][:n]
    if not lines:
        raise PortLLMError(f"{path} has no non-empty lines to repair on")
    return lines
