"""The typer app and the consoles every command module shares.

When stdout is not a terminal (`make demo | tee log`), tables are drawn at full width so no
column is cut to "θ (zero…"; colour is dropped there by rich itself.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

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
_LEVEL_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "red"}
_VERDICT_STYLE = {"compatible": "bold green", "compatible with warnings": "bold yellow", "incompatible": "bold red"}


def _json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
