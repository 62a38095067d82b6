"""The shipped suite: every definition in defs/, looked up by name, and its README table."""

from __future__ import annotations

from ..errors import PortLLMError
from .loader import load_dir
from .schema import METRICS, Task

TASKS: dict[str, Task] = load_dir()
PAPER_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.paper)


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        key = next((n for n, t in TASKS.items() if key in t.aliases), key)
    if key not in TASKS:
        raise PortLLMError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(spec: str) -> list[Task]:
    names = [s for s in spec.split(",") if s.strip()]
    if not names:
        raise PortLLMError("no task given; e.g. --tasks sst2,boolq")
    if names == ["paper"]:
        names = list(PAPER_TASKS)
    return [get_task(n) for n in names]


def markdown_table(tasks: dict[str, Task] | None = None) -> str:
    """The README's task-suite table (task, train part, eval part, metric), from the definitions."""
    lines = ["| task | train part | eval part | metric |", "|---|---|---|---|"]
    for name, t in (TASKS if tasks is None else tasks).items():
        cells = [name, t.train.note or t.train.file, t.eval.note or t.eval.file, METRICS[t.metric]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
