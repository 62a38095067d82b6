"""Run one library function in a fresh process, so its peak memory and wall time are its own.

An experiment that trains, ports and evaluates in one process would report the largest step's
memory for every step. `run(fn, *args)` starts a spawned child (a clean interpreter: no memory or
threads inherited), calls `fn` there under `resources.measure()` and hands back its (picklable)
result with the child's Usage. The child keeps stdout clean (its output goes to stderr, like a
progress bar), inherits the parent's warning filters, and an exception there comes back as a
one-line PortLLMError carrying the child's message.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import PortLLMError
from .resources import Usage, measure

T = TypeVar("T")


def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> tuple[T, Usage]:
    """`fn(*args, **kwargs)` in a spawned child process: (its result, the child's wall time and peak RSS).

    `fn` must be importable by name (a module-level function) and its arguments and result picklable.
    """
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child, args=(send, fn, args, kwargs, list(warnings.filters)), name=f"portllm:{_name(fn)}"
    )
    try:
        with _bare_main():
            child.start()  # pickles fn and its arguments
    except BaseException:
        recv.close()
        raise
    finally:
        send.close()  # only the child writes; EOF then means it died
    try:
        try:
            status, value, usage = recv.recv()
        except EOFError:
            child.join()
            raise PortLLMError(f"{_name(fn)} died in its child process (exit code {child.exitcode})") from None
        child.join()
    finally:
        recv.close()
        if child.is_alive():  # interrupted while waiting: do not leave the step running
            child.terminate()
            child.join()
    if status != "ok":
        raise PortLLMError(value)
    return value, usage


@contextmanager
def _bare_main() -> Iterator[None]:
    """Spawn re-imports the parent's __main__ in the child; for the `portllm` CLI that is typer, rich and
    every command module (~70 MB of the step's peak RSS). The step needs none of it: hide __main__."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _one_line(fn: Callable[..., Any], e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, PortLLMError):
        return msg
    return f"{_name(fn)} failed: {type(e).__name__}" + (f": {msg}" if msg else "")


def _child(send: Any, fn: Callable[..., Any], args: tuple, kwargs: dict, filters: list) -> None:
    """The child's side: stdout onto stderr, the parent's warning filters, measure, send back."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    try:
        _use_filters(filters)

        with measure() as usage:
            result = fn(*args, **kwargs)
        reply = ("ok", result, usage)
    except BaseException as e:  # every failure goes back to the parent, as one line
        reply = ("error", _one_line(fn, e), None)
    try:
        send.send(reply)
    except Exception as e:  # an unpicklable result
        send.send(("error", f"{_name(fn)} returned a result that cannot leave its process: {e}", None))
    finally:
        send.close()


def _use_filters(filters: list) -> None:
    """The parent's warning filters (the CLI silences library warnings; a library caller may not)."""
    warnings.resetwarnings()
    for action, message, category, module, lineno in filters:
        warnings.filterwarnings(action, _pattern(message), category, _pattern(module), lineno, append=True)


def _pattern(x: Any) -> str:
    return getattr(x, "pattern", x) or ""  # a filter holds a compiled regex, a plain string or None
