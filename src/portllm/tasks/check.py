"""`portllm tasks --check FILE`: is a user's task file usable, and do its prompts read as meant?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import load_examples
from .registry import load_user_task
from .schema import Example, Task


@dataclass(frozen=True)
class TaskCheck:
    """A task file that loaded, with both splits read in full (so a bad row anywhere fails the check)."""

    task: Task
    n_train: int
    n_eval: int
    examples: tuple[Example, ...]  # the first few eval examples, rendered


def check_task_file(path: str | Path, data: str | Path | None = None, show: int = 3) -> TaskCheck:
    """Load the file and every row of its splits; a mistake is the one-line PortLLMError of the loader."""
    task = load_user_task(path)
    train = load_examples(task, "train", data)
    ev = load_examples(task, "eval", data)
    return TaskCheck(task, len(train), len(ev), tuple(ev[:show]))


def render_example(task: Task, e: Example) -> str:
    """An example as the model sees it, the answer marked: the prompt, then each choice (mc) or the reference."""
    if task.kind == "gen":
        return f"{e.prompt}\n  -> reference: {e.gold!r}"
    shared = len(set(e.contexts)) == 1
    lines = [e.contexts[0]] if shared else []
    for i, (ctx, cont) in enumerate(zip(e.contexts, e.continuations)):
        mark = "*" if i == e.gold else " "
        lines.append(f" {mark} [{i}] " + (repr(cont) if shared else f"{ctx!r} + {cont!r}"))
    return "\n".join(lines)
