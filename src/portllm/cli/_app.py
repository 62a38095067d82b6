"""The typer app and the consoles every command module shares.

When stdout is not a terminal (`make demo | tee log`), tables are drawn at full width so no
column is cut to "θ (zero…"; colour is dropped there by rich itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..tasks import include_path

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Portable model patches: carry LoRA fine-tunes onto evolved base LLMs without training.",
)

PIPE_WIDTH = 240  # wide enough for every table portllm prints


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPE_WIDTH)


out = _console(stderr=False)
err = _console(stderr=True)

SPEC_HELP = "model directory, hub id, .gguf file, or embedded name (smollm2-135m, gemma3-270m)"
LEVEL_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "red"}
VERDICT_STYLE = {"compatible": "bold green", "compatible with warnings": "bold yellow", "incompatible": "bold red"}


def _include_tasks(dirs: Optional[list[Path]]) -> Optional[list[Path]]:
    """Parsed before the command runs, so every task spec it reads can name these folders' tasks."""
    include_path(*(dirs or ()))
    return dirs


# One option for every command that takes task names: `include: Optional[list[Path]] = INCLUDE_PATH`.
INCLUDE_PATH = typer.Option(
    None,
    "--include-path",
    help="a folder of your task files (*.yaml): their tasks can then be named like shipped ones; repeatable "
    "(also $PORTLLM_TASKS_PATH, folders separated by the OS path separator)",
    callback=_include_tasks,
)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def say(label: str, message: str, style: str = "red") -> None:
    """One styled label, then `message` printed literally on stderr: a message's own square brackets
    (`pip install 'portllm[serve]'`) are text, never rich markup."""
    err.print(f"[{style}]{label}[/{style}] {escape(message)}", highlight=False, soft_wrap=True)


def log_line(message: str) -> None:
    """A progress or log line on stderr, printed literally."""
    err.print(message, highlight=False, markup=False, soft_wrap=True)
