"""Task lookup: the shipped suite (defs/), a user's task files by path, and folders of them by name.

A spec is a shipped task's name or alias, a path to a task file (`my/task.yaml`), or the name of a task
in a folder added with `include_path` (`--include-path DIR`) or listed in $PORTLLM_TASKS_PATH
(os.pathsep-separated, lm-evaluation-harness's convention). A user's task may not take a shipped
task's name: a result or cache keyed by "sst2" must mean the shipped SST-2.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import PortLLMError
from .loader import load_dir, load_user_file
from .schema import METRICS, Task

TASKS: dict[str, Task] = load_dir()
PAPER_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.paper)
SHIPPED_NAMES = set(TASKS) | {a for t in TASKS.values() for a in t.aliases}
INCLUDED: list[Path] = []  # folders added by include_path (--include-path), searched before $PORTLLM_TASKS_PATH
ENV_VAR = "PORTLLM_TASKS_PATH"
_LOADED: dict[tuple[str, str], Task] = {}  # (resolved path, sha256 of its bytes) -> a user's task


def is_task_file(spec: str | Path) -> bool:
    """Does `spec` name a task file (a .yaml/.yml path) rather than a task?"""
    return str(spec).lower().endswith((".yaml", ".yml"))


def include_path(*dirs: str | Path) -> None:
    """Make the tasks in these folders of task files nameable (`--include-path DIR`)."""
    for d in dirs:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise PortLLMError(f"--include-path {d}: not a directory of task files")
        if p.resolve() not in [q.resolve() for q in INCLUDED]:
            INCLUDED.append(p)


def task_dirs() -> list[Path]:
    """The folders user tasks are looked up in by name: --include-path ones, then $PORTLLM_TASKS_PATH's."""
    env = [Path(s).expanduser() for s in os.environ.get(ENV_VAR, "").split(os.pathsep) if s.strip()]
    for p in env:
        if not p.is_dir():
            raise PortLLMError(f"{ENV_VAR}: {p} is not a directory of task files")
    return INCLUDED + env


def load_user_task(path: str | Path) -> Task:
    """A user's task file, loaded once per version of the file; refused if it takes a shipped task's name."""
    p = Path(path).expanduser()
    try:
        key = (str(p.resolve()), hashlib.sha256(p.read_bytes()).hexdigest())  # an edited file is loaded afresh
    except OSError:
        raise PortLLMError(f"{p}: task file does not exist or cannot be read") from None
    if key not in _LOADED:
        task = load_user_file(p)
        clash = next((n for n in (task.name, *task.aliases) if n.lower().replace("-", "_") in SHIPPED_NAMES), None)
        if clash is not None:
            field = "name" if clash == task.name else "aliases"
            raise PortLLMError(f"{p}: {field}: {clash!r} is a shipped task's name; rename the task and its file")
        _LOADED[key] = task
    return _LOADED[key]


def user_tasks() -> dict[str, Task]:
    """Every task in the --include-path and $PORTLLM_TASKS_PATH folders, by name; two of one name are refused."""
    found: dict[str, Task] = {}
    for d in task_dirs():
        for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            t = load_user_task(f)
            for n in (t.name, *t.aliases):
                if n in found and found[n].source != t.source:
                    raise PortLLMError(f"{f}: name: {n!r} is also the task of {found[n].source}; rename one")
                found[n] = t
    return found


def get_task(name: str | Path) -> Task:
    """The task a spec names: a task file's path, a shipped name or alias, or a task in the user's folders."""
    if is_task_file(name):
        return load_user_task(name)
    key = str(name).strip().lower().replace("-", "_")
    if key not in TASKS:
        key = next((n for n, t in TASKS.items() if key in t.aliases), key)
    if key in TASKS:
        return TASKS[key]
    user = user_tasks()
    spec = str(name).strip()
    if spec in user or key in user:
        return user[spec if spec in user else key]
    extra = f"; yours: {', '.join(sorted({t.name for t in user.values()}))}" if user else ""
    raise PortLLMError(
        f"unknown task {str(name)!r}; known: {', '.join(TASKS)}{extra} "
        f"(or a task file path, or a folder of them with --include-path / {ENV_VAR})"
    )


def task_key(spec: str) -> str:
    """What a cache keys a task spec by: the spec itself for a shipped task (so existing caches resume),
    name@sha256:<file hash> for a user's task file, so two files of one name are never one entry."""
    t = get_task(spec)
    return t.identity if t.sha256 else spec


def parse_tasks(spec: str) -> list[Task]:
    names = [s for s in spec.split(",") if s.strip()]
    if not names:
        raise PortLLMError("no task given; e.g. --tasks sst2,boolq")
    if names == ["paper"]:
        names = list(PAPER_TASKS)
    tasks = [get_task(n) for n in names]
    seen: dict[str, Task] = {}
    for t in tasks:
        if t.name in seen and seen[t.name].source != t.source:
            raise PortLLMError(f"two tasks named {t.name!r}: {seen[t.name].source} and {t.source}; rename one")
        seen[t.name] = t
    return tasks


def markdown_table(tasks: dict[str, Task] | None = None) -> str:
    """The README's task-suite table (task, train part, eval part, metric), from the definitions."""
    lines = ["| task | train part | eval part | metric |", "|---|---|---|---|"]
    for name, t in (TASKS if tasks is None else tasks).items():
        cells = [name, t.train.note or t.train.file, t.eval.note or t.eval.file, METRICS[t.metric]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
