"""`portllm` command line: a thin layer over the library API, one module per group of commands.

Exit codes: 0 success (check: compatible), 1 check: compatible with warnings,
2 check: incompatible, 3 any error (printed as one line), 130 interrupted.

Command modules import the library inside each command on purpose: `portllm --help` and a one-line
usage error never load transformers, PEFT, FastAPI or a command's whole subsystem. Some still import torch at
start-up (about a second), so `portllm port ...` imports only its own command module (`QUICK`): the port copies
the base's shards while torch loads. `app` (with every command) is made on first use.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

import click

from ..errors import PortLLMError
from . import _app
from ._app import err, say

COMMAND_MODULES = ("base", "evaluation", "merging", "patches", "routing", "serving", "study", "training", "trust")
QUICK = {"port": "patches"}  # command -> the one module it needs (tests/test_lazy_import.py checks each)


def register(argv: list[str] | None = None) -> None:
    """Import the command modules: each registers its commands on the app. Only the one a `QUICK` command needs
    when `argv` starts with it (the others import torch)."""
    for name in [QUICK[argv[0]]] if argv and argv[0] in QUICK else COMMAND_MODULES:
        importlib.import_module(f".{name}", __name__)


def __getattr__(name: str) -> Any:
    """`app`, with every command registered."""
    if name == "app":
        register()
        return _app.app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _click_classes(name: str) -> tuple[type, ...]:
    """Typer >= 0.20 raises its own vendored copy of click's exceptions, older ones click's."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored

        found.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(found)


_ABORTS = _click_classes("Abort")
_USAGE_ERRORS = _click_classes("ClickException")


def _quiet_libraries() -> None:
    """Library chatter (transformers' FutureWarnings, hub progress bars) is not the CLI's output."""
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    """Entry point: one-line errors, meaningful exit codes, no tracebacks for user mistakes."""
    _quiet_libraries()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind like Ctrl-C: outputs cleaned up, exit 130
    register(sys.argv[1:])
    try:
        rc = _app.app(standalone_mode=False)
    except PortLLMError as e:
        say("error:", str(e))
        sys.exit(3)
    except (KeyboardInterrupt, *_ABORTS):
        err.print("interrupted")
        sys.exit(130)
    except _USAGE_ERRORS as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if not e.format_message():  # the help was just shown for a bare command
            sys.exit(0)
        say("error:", f"{e.format_message()}{hint}")
        sys.exit(3)  # not click's 2, which `check` uses for "incompatible"
    sys.exit(rc if isinstance(rc, int) else 0)
