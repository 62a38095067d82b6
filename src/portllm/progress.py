"""One progress bar for every long step (port, eval, train): rich when asked for, silent otherwise.

It is drawn on stderr: a bar is not output, and `portllm eval | tee` or an isolated step keeps stdout clean.
"""

from __future__ import annotations

from typing import Any


class Bar:
    def __init__(self, enabled: bool, total: int, label: str, start: int = 0, **fields: Any):
        self._p = None
        if not enabled:
            return
        # deferred: rich takes ~80 ms to import, and a port or eval run without a bar need not pay it
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        cols = [TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn()]
        cols += [TextColumn(f"{k} {{task.fields[{k}]}}") for k in fields]
        cols += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._p = Progress(*cols, transient=True, console=Console(stderr=True))
        self._id = self._p.add_task(label, total=total, completed=start, **fields)

    def __enter__(self) -> Bar:
        if self._p:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p:
            self._p.stop()
            self._p = None

    def describe(self, text: str) -> None:
        if self._p:
            self._p.update(self._id, description=text)

    def advance(self, n: int = 1) -> None:
        if self._p:
            self._p.advance(self._id, n)

    def update(self, completed: int, **fields: Any) -> None:
        if self._p:
            self._p.update(self._id, completed=completed, **fields)
